"""The classifier under defense: however the user brings it, a query-only :class:`core.BlackBox`.

Denoised smoothing (Salman et al., NeurIPS 2020) puts a denoiser D in front of a classifier f that
may only be *queried*; ZO-AE-DS (Zhang et al., ICLR 2022) and DeepZero train D without f's gradient.
This module delivers f to the rest of the application as a :class:`Target` whose ``blackbox``
maps pixels ``x [N, C, H, W]`` in [0, 1] to logits ``[N, K]`` (float), or to labels ``[N]``
(int64) in labels-only mode — counting queries, enforcing a budget, splitting batches, and raising
:class:`core.NotDifferentiable` on any backward pass. A target spec is one of:

- a checkpoint path: a ``classify`` checkpoint, or a defense target checkpoint
  (:func:`applications.certified_defense.provider.save_target`);
- ``pkg.module:obj``: an ``nn.Module`` (instance, class or no-argument factory) or a function
  ``x [N, C, H, W] -> logits [N, K]``;
- ``exec:COMMAND``: an external program speaking :mod:`solvers.query`'s frames on stdin/stdout,
  started once and kept alive (see :mod:`applications.certified_defense.example_target`);
- ``http://127.0.0.1:PORT``: a classifier behind HTTP
  (:func:`applications.certified_defense.provider.serve_target`, or a plain UM-Bridge model).

A classifier program's handshake (:func:`classifier_spec`) is the query handshake with
``input_shape [C, H, W]``, ``output_shape [K]`` (``float32`` logits) or ``[]`` (``int64`` labels),
plus ``"output": "logits" | "labels"`` and ``"num_classes": K``.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core import BlackBox, BudgetExceeded
from core.blackbox import module_device, on_input_device
from solvers.http_query import HTTPQuery
from solvers.protocol import SolverError
from solvers.query import QuerySpec, SubprocessQuery

TARGET_KIND = "target"          # the ``kind`` of a defense target checkpoint (app "defense")
_DATA_SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32)}
_IMPORT_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
SPEC_FORMS = "a checkpoint path, pkg.module:callable, exec:COMMAND or http://127.0.0.1:PORT"


class TargetError(RuntimeError):
    """The target classifier cannot be loaded or queried; the message is one line saying why."""


def _one_line(text: str) -> str:
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


@dataclass
class Target:
    """A classifier reachable only through queries, plus what the application needs to know of it.

    Attributes:
        blackbox: ``x [N, C, H, W]`` pixels in [0, 1] → logits ``[N, K]`` float, or labels ``[N]``
            int64 when ``labels_only``; counts queries (one per image), enforces ``budget``.
        num_classes: K.
        input_shape: ``(C, H, W)`` of one image.
        labels_only: the black box answers labels (argmax) only.
        white_box: the classifier module itself when we have it (a checkpoint or an in-process
            module) — for the white-box FO-DS baseline and the auto-LiRPA comparator only; it is a
            separate copy, so nothing done to it changes the black box. ``None`` otherwise.
        description: one line saying what the target is.
    """

    blackbox: BlackBox
    num_classes: int
    input_shape: tuple[int, ...]
    labels_only: bool = False
    white_box: nn.Module | None = None
    description: str = ""
    _closer: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels ``[N]`` (int64) of ``x [N, C, H, W]`` through the black box (N queries)."""
        out = self.blackbox(x)
        return out if self.labels_only else out.argmax(1)

    def close(self) -> None:
        """End the classifier program or connection (idempotent)."""
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_checkpoint_model(path: str | os.PathLike) -> tuple[nn.Module, tuple[int, ...] | None, int | None]:
    """The classifier of a ``classify`` or defense target checkpoint, in eval mode, taking [0, 1] pixels.

    Returns ``(model, input_shape, num_classes)``; the last two are ``None`` when the checkpoint
    does not say (a ``classify`` checkpoint of image folders).
    """
    from core.models import from_spec
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.errors import UserError

    try:
        state = load_checkpoint(path)
    except UserError as exc:
        raise TargetError(str(exc)) from None
    app = state.get("app")
    if app == "defense" and state.get("kind") != TARGET_KIND:
        raise TargetError(f"checkpoint {path} is a defense run's checkpoint (its model is the denoiser), not "
                          "a target; give the classifier's own checkpoint")
    if app not in ("classify", "defense"):
        raise TargetError(f"checkpoint {path} was written by app {app!r}; a target is a classify checkpoint "
                          "or a defense target checkpoint (save_target)")
    if not state.get("model_spec") or state.get("model") is None:
        raise TargetError(f"checkpoint {path} does not describe its model (written by an older version)")
    try:
        model = from_spec(state["model_spec"], state["model"]).eval()
    except ValueError as exc:
        raise TargetError(f"checkpoint {path}: {exc}") from None
    if app == "defense":
        return model, tuple(int(s) for s in state["input_shape"]), int(state["num_classes"])
    kwargs, data = state["model_spec"].get("kwargs") or {}, (state.get("config") or {}).get("data") or {}
    side = _DATA_SHAPES.get(data.get("name"), (None, data.get("image_size"), data.get("image_size")))
    channels = kwargs.get("in_channels", side[0])
    shape = (channels, side[1], side[2]) if channels and side[1] else None
    return model, shape, kwargs.get("num_classes")


# -- the classifier protocol -----------------------------------------------------------------------

def classifier_spec(input_shape: tuple[int, ...], num_classes: int, *,
                    labels_only: bool = False) -> QuerySpec:
    """The handshake a classifier program or server declares: images in, logits (or labels) out."""
    kind = "labels" if labels_only else "logits"
    return QuerySpec(tuple(int(s) for s in input_shape), () if labels_only else (int(num_classes),),
                     np.dtype(np.float32), np.dtype(np.int64 if labels_only else np.float32),
                     {"output": kind, "num_classes": int(num_classes)})


def _declared_labels(spec: QuerySpec, who: str, data_shape: tuple[int, ...], num_classes: int,
                     labels_only: bool) -> bool:
    """Check a program's handshake against the data; True when it answers labels only."""
    kind, k = spec.info.get("output"), spec.info.get("num_classes")
    if kind not in ("logits", "labels") or isinstance(k, bool) or not isinstance(k, int):
        raise TargetError(f"{who} does not declare itself a classifier: its handshake needs \"output\": "
                          f"\"logits\" | \"labels\" and an int \"num_classes\"; got {dict(spec.info)}")
    if kind == "logits" and (spec.output_shape != (k,) or spec.output_dtype.kind != "f"):
        raise TargetError(f"{who} declares logits but output shape {list(spec.output_shape)} of "
                          f"{spec.output_dtype}; logits are [{k}] floats")
    if kind == "labels" and (spec.output_shape != () or spec.output_dtype.kind not in "iu"):
        raise TargetError(f"{who} declares labels but output shape {list(spec.output_shape)} of "
                          f"{spec.output_dtype}; labels are [] integers")
    if spec.input_shape != tuple(data_shape):
        raise TargetError(f"{who} takes images {list(spec.input_shape)}; the data are {list(data_shape)}")
    if k != num_classes:
        raise TargetError(f"{who} has {k} classes; the data have {num_classes}")
    if kind == "labels" and not labels_only:
        raise TargetError(f"{who} answers labels only, not logits; load it in labels-only mode "
                          "(labels_only=True, CLI --labels-only)")
    return kind == "labels"


def _query_fn(raw: Callable[[torch.Tensor], Any], *, who: str, input_shape: tuple[int, ...], num_classes: int,
              emits_labels: bool, labels_only: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The BlackBox's callable: checks what goes in and what comes back, argmaxes for labels-only."""

    def query(x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape:
            raise TargetError(f"{who} takes images [N, {', '.join(map(str, input_shape))}]; "
                              f"got {list(x.shape)}")
        try:
            out = raw(x)
        except (TargetError, BudgetExceeded):
            raise
        except SolverError as exc:
            raise TargetError(_one_line(exc)) from None
        except Exception as exc:        # an in-process classifier failed: one line, the cause chained
            raise TargetError(f"{who} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
        out = torch.as_tensor(out).to(x.device)
        if emits_labels:
            if out.shape != (n,) or out.dtype.is_floating_point or out.dtype.is_complex:
                raise TargetError(f"{who} returned {tuple(out.shape)} {out.dtype}; labels are [{n}] integers")
            if n and (int(out.min()) < 0 or int(out.max()) >= num_classes):
                raise TargetError(f"{who} returned labels outside 0..{num_classes - 1}")
            return out.long()
        if out.shape != (n, num_classes) or not out.dtype.is_floating_point:
            raise TargetError(f"{who} returned {tuple(out.shape)} {out.dtype}; logits are "
                              f"[{n}, {num_classes}] floats")
        if not torch.isfinite(out).all():
            raise TargetError(f"{who} returned {int((~torch.isfinite(out)).sum())} NaN/Inf logits")
        return out.argmax(1) if labels_only else out

    return query


def _probe(module: nn.Module, who: str, data_shape: tuple[int, ...], num_classes: int | None) -> int:
    """One local (uncounted) forward of a zero image: the module must give ``[1, K]`` logits; returns K."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *data_shape, device=module_device(module)))
    except Exception as exc:
        raise TargetError(f"{who} fails on a [1, {', '.join(map(str, data_shape))}] image: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TargetError(f"{who} returns {shape} for one image; a classifier returns logits [1, K]")
    if num_classes is not None and out.shape[1] != num_classes:
        raise TargetError(f"{who} has {out.shape[1]} classes; the data have {num_classes}")
    return int(out.shape[1])


def _resolve_import(spec: str) -> tuple[nn.Module | None, Callable[..., Any] | None]:
    """``pkg.module:obj`` → (module, None) for an nn.Module, class or factory; (None, fn) for a function."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise TargetError(f"cannot import target {spec!r}: {type(exc).__name__}: {_one_line(exc)}") from None
    if isinstance(obj, nn.Module):
        return obj, None
    if not callable(obj):
        raise TargetError(f"target {spec!r} is a {type(obj).__name__}, not an nn.Module or a callable")
    try:
        params = inspect.signature(obj).parameters.values()
        factory = inspect.isclass(obj) or all(
            p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
    except (TypeError, ValueError):     # no signature (a builtin): call it on images
        factory = False
    if not factory:
        return None, obj
    try:
        made = obj()
    except Exception as exc:
        raise TargetError(f"target {spec!r} failed to build: {type(exc).__name__}: "
                          f"{_one_line(exc)}") from None
    if isinstance(made, nn.Module):
        return made, None
    if callable(made):
        return None, made
    raise TargetError(f"target {spec!r} built a {type(made).__name__}, not an nn.Module or a callable")


# -- loading a target ------------------------------------------------------------------------------

def _in_process(module: nn.Module | None, fn: Callable[..., Any] | None, *, who: str,
                data_shape: tuple[int, ...], num_classes: int | None, labels_only: bool, budget: int | None,
                max_batch: int | None, description: str) -> Target:
    white_box = None
    if module is not None:
        white_box = module.eval()
        box_module = copy.deepcopy(module).eval().requires_grad_(False)
        num_classes = _probe(box_module, who, data_shape, num_classes)
        fn = on_input_device(box_module)
    elif num_classes is None:
        raise ValueError(f"{who} is a plain function: give num_classes")
    query = _query_fn(fn, who=who, input_shape=data_shape, num_classes=num_classes, emits_labels=False,
                      labels_only=labels_only)
    box = BlackBox(query, budget=budget, max_batch=max_batch, name="target")
    return Target(box, num_classes, data_shape, labels_only, white_box, description)


def target_from_module(module: nn.Module, *, data_shape: tuple[int, ...], num_classes: int | None = None,
                       labels_only: bool = False, budget: int | None = None, max_batch: int | None = None,
                       description: str = "an in-process classifier") -> Target:
    """A classifier module in this process as a :class:`Target` (its white box kept for FO-DS/verify)."""
    return _in_process(module, None, who=description, data_shape=tuple(data_shape), num_classes=num_classes,
                       labels_only=labels_only, budget=budget, max_batch=max_batch, description=description)


def _remote(client: SubprocessQuery | HTTPQuery, *, who: str, data_shape: tuple[int, ...], num_classes: int,
            labels_only: bool, budget: int | None, max_batch: int | None, description: str) -> Target:
    try:
        emits = _declared_labels(client.spec, who, data_shape, num_classes, labels_only)
        query = _query_fn(lambda x: torch.from_numpy(client.query(x.detach().cpu())), who=who,
                          input_shape=data_shape, num_classes=num_classes, emits_labels=emits,
                          labels_only=labels_only)
        box = BlackBox(query, budget=budget, max_batch=max_batch, name="target")
    except BaseException:
        client.close()
        raise
    return Target(box, num_classes, data_shape, labels_only, None, description, client.close)


def _check_shape(data_shape: Any, num_classes: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in data_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or min(shape) < 1 or any(isinstance(s, bool) for s in data_shape):
        raise ValueError(f"data_shape must be the (C, H, W) of one image, positive ints; got {data_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    return shape


def load_target(spec: str, *, data_shape: tuple[int, ...], num_classes: int, labels_only: bool = False,
                budget: int | None = None, max_batch: int | None = None, timeout: float = 60.0) -> Target:
    """The classifier named by ``spec`` as a :class:`Target` (see the module docstring for the forms).

    Args:
        spec: a checkpoint path, ``pkg.module:obj``, ``exec:COMMAND`` or ``http://HOST:PORT``.
        data_shape: ``(C, H, W)`` of the data's images; the target must take them.
        num_classes: K of the data; the target must have as many.
        labels_only: the black box answers labels ``[N]`` int64 (the argmax) instead of logits.
        budget: the most queries (images) the black box answers; the call that would pass it
            raises :class:`core.BudgetExceeded` before querying.
        max_batch: the most images per request to the classifier (larger batches are split).
        timeout: seconds for an ``exec:`` program's handshake and each answer, or per HTTP request.
            (An in-process classifier has no timeout.)

    Raises:
        ValueError: a malformed argument.
        TargetError: an unknown spec, an unreadable checkpoint, a target that does not fit the data,
            or a program that does not start or declares itself wrongly; later, any failed query
            (crash, hang past ``timeout``, NaN/Inf, wrong shape or dtype), with the program's stderr tail.
    """
    shape = _check_shape(data_shape, num_classes)
    if not isinstance(spec, str) or not spec.strip():
        raise TargetError(f"empty target spec; give {SPEC_FORMS}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0; got {timeout}")
    common = {"data_shape": shape, "num_classes": num_classes, "labels_only": labels_only, "budget": budget,
              "max_batch": max_batch}
    if budget is not None or max_batch is not None:     # argument errors before any process starts
        BlackBox(lambda x: x, budget=budget, max_batch=max_batch)
    if spec.startswith("exec:"):
        try:
            cmd = shlex.split(spec[len("exec:"):])
        except ValueError as exc:
            raise TargetError(f"bad command in {spec!r}: {exc}") from None
        if not cmd:
            raise TargetError("exec: needs a command, e.g. exec:python -m applications.certified_defense."
                              "example_target --checkpoint CKPT")
        try:
            client = SubprocessQuery(cmd, timeout, role="classifier program")
        except SolverError as exc:
            raise TargetError(_one_line(exc)) from None
        return _remote(client, who=f"classifier program {client.name}", description=f"program {client.name}",
                       **common)
    if spec.startswith(("http://", "https://")):
        fallback = classifier_spec(shape, num_classes)      # for a plain UM-Bridge model: K logits
        try:
            client = HTTPQuery(spec, timeout, spec=fallback, role="classifier server")
        except SolverError as exc:
            raise TargetError(_one_line(exc)) from None
        return _remote(client, who=f"classifier server at {client.url}", description=f"server {client.url}",
                       **common)
    if os.path.isfile(spec) or spec.endswith((".pt", ".pth", ".ckpt")):
        model, ckpt_shape, ckpt_k = load_checkpoint_model(spec)
        if ckpt_shape is not None and tuple(ckpt_shape) != shape:
            raise TargetError(f"checkpoint {spec}'s classifier takes images {list(ckpt_shape)}; the data are "
                              f"{list(shape)}")
        if ckpt_k is not None and ckpt_k != num_classes:
            raise TargetError(f"checkpoint {spec}'s classifier has {ckpt_k} classes; the data have "
                              f"{num_classes}")
        return _in_process(model, None, who=f"checkpoint {spec}", description=f"checkpoint {spec}", **common)
    if _IMPORT_SPEC.fullmatch(spec):
        module, fn = _resolve_import(spec)
        return _in_process(module, fn, who=f"target {spec}", description=f"import {spec}", **common)
    raise TargetError(f"unknown target {spec!r}: not an existing file; give {SPEC_FORMS}")


__all__ = ["Target", "TargetError", "classifier_spec", "load_checkpoint_model", "load_target"]
