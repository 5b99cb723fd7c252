"""The other side of :mod:`applications.certified_defense.targets`: a classifier to defend, made
and offered for querying.

- :func:`train_target` trains an ordinary first-order classifier on clean pixels and
  :func:`save_target` writes it as a defense target checkpoint, which
  :func:`~applications.certified_defense.targets.load_target` reads;
- :func:`serve_target` serves a :class:`~applications.certified_defense.targets.Target`, a module or
  a function over loopback HTTP (the routes of :mod:`solvers.http_query`), which ``load_target(url, ...)``
  queries.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from applications.certified_defense.targets import (TARGET_KIND, Target, TargetError, _check_shape, _in_process,
                                                    classifier_spec)
from core import BudgetExceeded
from solvers.protocol import SolverError
from solvers.http_query import serve_query_in_thread


# -- training and saving a target ------------------------------------------------------------------

def train_target(data, *, arch: str = "cnn", epochs: int = 3, lr: float = 1e-2, batch_size: int = 32,
                 seed: int = 0, depth: int = 3, width: int = 18,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """An ordinary first-order classifier on clean pixels: the model to be defended.

    Adam on cross-entropy with a one-cycle learning rate (peak ``lr``), ``epochs`` passes over
    ``data.train`` in seeded shuffled batches. The model starts with the data set's
    :class:`core.models.Normalize`, so it takes [0, 1] pixels. On the 4,000 MNIST training digits
    the default depth-3 width-18 CNN reaches ~97% test accuracy in 3 epochs (~8 s on one CPU core).

    Args:
        data: a :class:`core.runtime.data.Dataset` of pixels (``load_dataset(name, normalize=False)``).
        arch: a zoo classifier (``cnn``, ``lenet5``, ``resnet20``); ``depth`` and ``width`` are
            the ``cnn``'s.
        seed: seeds the initialisation and the shuffling (the global RNG is left as it was).

    Returns:
        ``(model, spec)``: the model in eval mode, and its :func:`core.models.model_spec`
        (``core.models.from_spec(spec, model.state_dict())`` rebuilds it).
    """
    from core.models import build_model, model_spec, with_normalize
    from core.models.registry import ARCHS

    if getattr(data, "normalized", False):
        raise ValueError("train_target needs [0, 1] pixels (the normalisation becomes the model's first "
                         "layer): load the data with load_dataset(name, normalize=False)")
    if epochs < 1 or not lr > 0 or batch_size < 1:
        raise ValueError(f"train_target needs epochs >= 1, lr > 0, batch_size >= 1; got epochs={epochs}, "
                         f"lr={lr}, batch_size={batch_size}")
    c, h = data.input_shape[0], data.input_shape[1]
    wanted = {"in_channels": c, "num_classes": data.num_classes, "image_size": h, "depth": depth,
              "width": width}
    takes = inspect.signature(ARCHS[arch]).parameters if arch in ARCHS else wanted
    kwargs = {k: v for k, v in wanted.items() if k in takes}
    gpu = torch.device(device)
    with torch.random.fork_rng(devices=[gpu] if gpu.type == "cuda" else []):   # manual_seed seeds GPUs too
        torch.manual_seed(seed)
        model = with_normalize(build_model(arch, **kwargs), (data.mean, data.std)).to(device)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.train.x, data.train.y
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # one-cycle: the annealed end also settles BatchNorm's running statistics for eval mode
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(y) // batch_size))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    return model.eval(), model_spec(model)


def save_target(path: str | os.PathLike, model: nn.Module, *, input_shape: tuple[int, ...],
                num_classes: int) -> Path:
    """Write a defense target checkpoint (app ``defense``, kind ``target``) for :func:`load_target`.

    Holds ``model_spec`` and ``model`` (the state dict) of a zoo model (:func:`train_target`'s), and
    the ``input_shape`` and ``num_classes`` it serves; written atomically, loaded ``weights_only``.
    """
    from core.models import model_spec
    from core.runtime.checkpoint import save_checkpoint

    return save_checkpoint(path, {"app": "defense", "kind": TARGET_KIND, "model_spec": model_spec(model),
                                  "model": model.state_dict(), "input_shape": [int(s) for s in input_shape],
                                  "num_classes": int(num_classes)})


# -- serving a target ------------------------------------------------------------------------------

@dataclass
class TargetServer:
    """A classifier served over loopback HTTP by :func:`serve_target`; ``close()`` stops it."""

    url: str
    target: Target
    server: Any = field(repr=False)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> TargetServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve_target(target_or_module: Target | nn.Module | Callable[..., Any], host: str = "127.0.0.1",
                 port: int = 0, *, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 labels_only: bool = False, allow_remote: bool = False, npy: bool = True) -> TargetServer:
    """Serve a classifier over HTTP (:mod:`solvers.http_query` routes) from a background thread.

    Args:
        target_or_module: a :class:`Target` (its black box answers, so its budget and query count
            apply on the server side), an ``nn.Module`` or a function ``x -> logits``.
        host, port: the bind address (port 0: any free port); a non-loopback host is refused
            unless ``allow_remote``.
        input_shape, num_classes: needed for a module (K is found by one forward if not given) or
            a function; a Target knows its own.
        labels_only: answer labels instead of logits (a labels-only Target always does).
        npy: accept ``.npy`` request bodies besides UM-Bridge JSON.

    Returns:
        a :class:`TargetServer`; ``load_target(server.url, ...)`` queries it.
    """
    if isinstance(target_or_module, Target):
        target = target_or_module
    else:
        if input_shape is None:
            raise ValueError("serve_target needs input_shape (C, H, W) to serve a module or a function")
        shape = _check_shape(input_shape, num_classes if num_classes is not None else 2)
        module = target_or_module if isinstance(target_or_module, nn.Module) else None
        fn = None if module is not None else target_or_module
        target = _in_process(module, fn, who="served classifier", data_shape=shape, num_classes=num_classes,
                             labels_only=labels_only, budget=None, max_batch=None, description="served")
    labels = labels_only or target.labels_only
    spec = classifier_spec(target.input_shape, target.num_classes, labels_only=labels)

    def answer(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = target.blackbox(torch.from_numpy(x))
        if labels and not target.labels_only:
            out = out.argmax(1)
        return out.cpu().numpy().astype(spec.output_dtype, copy=False)

    try:
        server, url = serve_query_in_thread(answer, spec, host, port, allow_remote=allow_remote, npy=npy,
                                            error_types=(BudgetExceeded,))
    except SolverError as exc:
        raise TargetError(str(exc)) from None
    except OSError as exc:
        raise TargetError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    return TargetServer(url, target, server)


__all__ = ["TargetServer", "save_target", "serve_target", "train_target"]
