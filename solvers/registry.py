"""``solvers.load(spec, **options)``: a registered name, an import path, a command, or a URL.

- ``"burgers"``, ``"wake"`` (and anything added with :func:`register`);
- ``"package.module:Class"`` — a user's class, constructed with ``**options``;
- ``"exec:python my_solver.py --flag"`` or a list of arguments — a :class:`SubprocessSolver`;
- ``"http://127.0.0.1:8765"`` — an :class:`HTTPSolver`.
"""
from __future__ import annotations

import importlib
import shlex
from collections.abc import Callable
from typing import Any

from solvers.protocol import SolverError

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
    _REGISTRY[name] = factory


def _burgers(**options):
    from solvers.burgers import Burgers

    return Burgers(**options)


def _wake(**options):
    from solvers.wake import WakeFlow

    if "resolution" in options:
        options["resolution"] = tuple(options["resolution"])
    return WakeFlow(**options)


register("burgers", _burgers)
register("wake", _wake)


def names() -> list[str]:
    return sorted(_REGISTRY)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["n=64", "resolution=[32, 64]"]`` -> ``{"n": 64, "resolution": [32, 64]}`` (YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise SolverError(f"bad solver option '{item}': expected key=value, e.g. n=64")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load(spec: str | list[str], **options: Any):
    if isinstance(spec, (list, tuple)):
        from solvers.subprocess_solver import SubprocessSolver

        return SubprocessSolver(list(spec), **options)
    if spec.startswith("exec:"):
        from solvers.subprocess_solver import SubprocessSolver

        return SubprocessSolver(shlex.split(spec[len("exec:"):]), **options)
    if spec.startswith(("http://", "https://")):
        from solvers.http import HTTPSolver

        return HTTPSolver(spec, **options)
    if spec in _REGISTRY:
        try:
            return _REGISTRY[spec](**options)
        except (TypeError, ValueError) as exc:
            raise SolverError(f"bad options for solver '{spec}': {exc}") from None
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SolverError(f"cannot import solver '{spec}': {exc}") from None
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise SolverError(f"bad options for solver '{spec}': {exc}") from None
    raise SolverError(f"unknown solver '{spec}'; use one of {', '.join(names())}, package.module:Class, "
                      "exec:COMMAND or an http:// URL")
