"""Finite differences need every bit of float32: reduced-precision float32 math is off while ZO evaluates.

Since NVIDIA's Ampere GPUs PyTorch runs float32 convolutions in TF32 by default (cuDNN's
``conv.fp32_precision`` is ``"tf32"``), and float32 matmuls too once
``torch.set_float32_matmul_precision("high")`` is set (on a CPU that also lets oneDNN round). TF32
keeps 10 of float32's 23 mantissa bits: a product's inputs are rounded by up to 2^-11 ≈ 4.9e-4
relative. A forward difference (ℓ(θ + μe) − ℓ(θ)) / μ with the usual μ = 5e-3 divides that
rounding by μ, and a perturbation w + μ of a weight w is itself rounded away to a few percent:
the estimate becomes noise where full float32 gives about three correct digits. Backprop does not
mind TF32 (its errors do not get divided by μ), so the setting stays the user's everywhere else.

:func:`ieee_float32` sets every float32 precision flag PyTorch has (CUDA matmul, cuDNN conv and
RNN, oneDNN matmul, conv and RNN) to ``"ieee"`` and restores the user's values on the way out, also
on an exception. Every estimator's ``backward``, ZO-GraSP and the input-space estimator run inside
it. The flags are process-wide: another thread's float32 work during an estimate runs in full
precision too. One difference remains after an estimate: a cuDNN flag the user never set reads
``"tf32"`` as PyTorch's default does, but is now set, so a later ``torch.backends.fp32_precision``
no longer reaches it (PyTorch offers no way to unset a flag).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_FLAGS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"),
          ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


@functools.cache
def _backends() -> tuple[Any, ...]:
    """The objects whose ``fp32_precision`` decides float32 math (those this PyTorch build has)."""
    found = []
    for name, op in _FLAGS:
        flag = getattr(getattr(torch.backends, name, None), op, None)
        if flag is not None and hasattr(flag, "fp32_precision"):
            found.append(flag)
    return tuple(found)


def _read(get: Callable[[], Any]) -> Any:
    """A setting through PyTorch's older API (None: it raises, the user mixed the old and new APIs)."""
    try:
        return get()
    except RuntimeError:
        return None


def snapshot() -> tuple:
    """Every float32 precision setting, through both of PyTorch's APIs, for :func:`restore`."""
    return (_read(torch.get_float32_matmul_precision), _read(lambda: bool(torch.backends.cudnn.allow_tf32)),
            [(flag, flag.fp32_precision) for flag in _backends()])


def restore(saved: tuple) -> None:
    """Put back what :func:`snapshot` read: the older API's values first (setting them rewrites the
    newer flags), then each flag's own value."""
    matmul, cudnn, flags = saved
    if matmul is not None:
        torch.set_float32_matmul_precision(matmul)
    if cudnn is not None:
        torch.backends.cudnn.allow_tf32 = cudnn
    for flag, value in flags:
        flag.fp32_precision = value


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full-precision float32 on every backend inside the block; the previous settings after it.

    The older API is switched too (``set_float32_matmul_precision("highest")``,
    ``cudnn.allow_tf32 = False``) where it was readable: PyTorch refuses to read it (``cudnn.flags``,
    ``cudnn.allow_tf32``) while the two APIs disagree, and a model's own forward may read it.
    """
    saved = snapshot()
    try:
        restore(("highest" if saved[0] is not None else None, False if saved[1] is not None else None,
                 [(flag, "ieee") for flag, _ in saved[2]]))
        yield
    finally:
        restore(saved)
