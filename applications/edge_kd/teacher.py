"""The teacher: a classify checkpoint or a query-only callable, always reached through ``core.BlackBox``.

A teacher source is either

- a checkpoint written by ``deepzero classify train`` (self-describing: ``model_spec`` rebuilds the
  model, which takes [0, 1] pixels); or
- ``pkg.module:name`` — an ``nn.Module`` (instance, class or no-argument factory) or a function
  ``x [N, C, H, W] pixels -> logits [N, K]``: a model we may only query.

Either way the student's training sees only a :class:`core.BlackBox` (no autograd, every sample
counted, an optional budget). A failing teacher raises :class:`TeacherError` with one line.
:func:`train_teacher` trains a teacher with ``deepzero classify train`` in a child process — the
classification app is run, never imported.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.blackbox import BlackBox, BudgetExceeded, on_input_device
from core.runtime.errors import UserError

_IMPORT = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
FORMS = "a checkpoint of 'deepzero classify train' or pkg.module:callable (a model to query)"


class TeacherError(RuntimeError):
    """The teacher could not answer; the message is one line."""


def _line(exc: BaseException) -> str:
    return " / ".join(s.strip() for s in str(exc).splitlines() if s.strip()) or type(exc).__name__


@dataclass
class Teacher:
    """A teacher as the app needs it.

    Attributes:
        fn: ``x [N, C, H, W] -> logits [N, K]`` (not yet counted; :meth:`box` counts).
        num_classes: K.
        spec: the zoo ``model_spec`` when the teacher is a checkpoint (the design starts from it).
        flops: forward FLOPs per sample when the teacher's weights are at hand, else None.
        description: one line.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    spec: dict[str, Any] | None
    flops: float | None
    description: str

    def box(self, *, name: str, budget: int | None = None, max_batch: int | None = None) -> BlackBox:
        """A fresh query-counting :class:`core.BlackBox` around the teacher."""
        return BlackBox(self._checked, budget=budget, name=name, max_batch=max_batch)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.fn(x)
        except (TeacherError, BudgetExceeded):
            raise
        except Exception as exc:
            raise TeacherError(f"the teacher ({self.description}) failed: {type(exc).__name__}: "
                               f"{_line(exc)}") from exc
        out = torch.as_tensor(out)
        if out.shape != (x.shape[0], self.num_classes) or not out.is_floating_point():
            raise TeacherError(f"the teacher ({self.description}) returned {tuple(out.shape)} {out.dtype}; "
                               f"logits are [{x.shape[0]}, {self.num_classes}] floats")
        if not bool(torch.isfinite(out).all()):
            raise TeacherError(f"the teacher ({self.description}) returned non-finite logits")
        return out.float()


def load_teacher(source: str, *, data_name: str, input_shape: tuple[int, ...], num_classes: int) -> Teacher:
    """The teacher ``source`` names (see the module docstring); one-line :class:`UserError` otherwise."""
    source = (source or "").strip()
    if not source:
        raise UserError(f"no teacher given: pass --teacher with {FORMS}")
    if _IMPORT.fullmatch(source) and not Path(source).exists():
        return _imported(source, input_shape, num_classes)
    return _checkpoint(Path(source).expanduser(), data_name, input_shape, num_classes)


def _checkpoint(path: Path, data_name: str, input_shape: tuple[int, ...], num_classes: int) -> Teacher:
    from applications.edge_kd.counters import forward_flops
    from core.models import from_spec
    from core.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    app = state.get("app")
    if app != "classify":
        raise UserError(f"teacher checkpoint {path} was written by app {app!r}; a teacher is {FORMS}")
    if not state.get("model_spec") or state.get("model") is None:
        raise UserError(f"teacher checkpoint {path} does not describe its model (written by an older version)")
    trained_on = ((state.get("config") or {}).get("data") or {}).get("name")
    if trained_on != data_name:
        raise UserError(f"teacher checkpoint {path} was trained on {trained_on!r}; data.name is {data_name!r}")
    try:
        model = from_spec(state["model_spec"], state["model"]).eval()
    except ValueError as exc:
        raise UserError(f"teacher checkpoint {path}: {_line(exc)}") from None
    try:
        flops = forward_flops(model, input_shape)
        with torch.no_grad():
            k = int(model(torch.zeros(1, *input_shape)).shape[1])
    except Exception as exc:   # e.g. a model for other image sizes or channels
        raise UserError(f"teacher checkpoint {path} fails on {list(input_shape)} images: {type(exc).__name__}: "
                        f"{_line(exc)}") from None
    if k != num_classes:
        raise UserError(f"teacher checkpoint {path} has {k} classes; the data have {num_classes}")
    run = state.get("mlflow_run_id") or "?"
    return Teacher(_no_grad(model), k, state["model_spec"], flops,
                   f"{state['model_spec']['arch']} from classify run {run[:8]}")


def _imported(source: str, input_shape: tuple[int, ...], num_classes: int) -> Teacher:
    module_name, _, attr = source.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:   # an import error of the user's module, whatever it is: one line
        raise UserError(f"cannot import teacher {source}: {type(exc).__name__}: {_line(exc)}") from None
    if inspect.isclass(obj) or (callable(obj) and not isinstance(obj, nn.Module) and _takes_nothing(obj)):
        try:
            obj = obj()
        except Exception as exc:
            raise UserError(f"cannot build teacher {source}(): {type(exc).__name__}: {_line(exc)}") from None
    if not callable(obj):
        raise UserError(f"teacher {source} is a {type(obj).__name__}, not a model or function x -> logits")
    flops = None
    if isinstance(obj, nn.Module):
        from applications.edge_kd.counters import forward_flops

        obj.eval()
        try:
            flops = forward_flops(obj, input_shape) if any(True for _ in obj.parameters()) else None
        except Exception as exc:   # the user's model does not take the data's images
            raise UserError(f"teacher {source} fails on {list(input_shape)} images: {type(exc).__name__}: "
                            f"{_line(exc)}") from None
    return Teacher(_no_grad(obj), num_classes, None, flops, f"query-only {source}")


def _takes_nothing(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())


def _no_grad(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` without autograd; a module runs on its input's device (moved there when it changes)."""
    run = on_input_device(fn) if isinstance(fn, nn.Module) else fn

    def query(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return run(x)

    return query


def train_teacher(cfg, *, n_train: int, progress: bool) -> Path:
    """Train the teacher (FO) with ``deepzero classify train`` in a child process; returns its checkpoint.

    It sees the first ``n_train`` training images only — the KD run's validation images stay unseen.
    """
    t = cfg.teacher
    sets = {"data.name": cfg.data.name, "data.train_subset": n_train, "data.batch_size": cfg.data.batch_size,
            "data.image_size": cfg.data.image_size, "model.arch": t.arch, "model.depth": t.depth,
            "model.width": t.width, "optim.method": "fo", "optim.epochs": t.epochs, "optim.lr": t.lr,
            "optim.warmup_epochs": 0, "zo.sparsity": 0.0, "run.seed": cfg.run.seed, "run.device": cfg.run.device,
            "run.run_name": f"kd-teacher-{t.arch}{t.depth}x{t.width}"}
    if cfg.data.data_root:
        sets["data.data_root"] = cfg.data.data_root
    cmd = [sys.executable, "-m", "applications", "classify", "train", "--no-progress"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root)
    lines = []
    for line in proc.stdout:                            # the classify run's epochs, as they finish
        lines.append(line.rstrip())
        if progress and line.startswith(("epoch", "run ")):
            print(f"  teacher {line.rstrip()}", flush=True)
    if proc.wait() != 0:
        errors = [s for s in lines if "error:" in s] or [s for s in lines if s.strip()] or [f"exit {proc.returncode}"]
        raise UserError(f"training the teacher with deepzero classify train failed: {errors[-1].strip()}")
    found = [s.split("checkpoint:", 1)[1].strip() for s in lines if s.startswith("checkpoint:")]
    if not found:
        raise UserError("deepzero classify train finished without printing its checkpoint")
    return Path(found[-1])
