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
precision too.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_FLAGS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"),
          ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def _backends() -> list[Any]:
    """The objects whose ``fp32_precision`` decides float32 math (those this PyTorch build has)."""
    found = []
    for name, op in _FLAGS:
        flag = getattr(getattr(torch.backends, name, None), op, None)
        if flag is not None and hasattr(flag, "fp32_precision"):
            found.append(flag)
    return found


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full-precision float32 on every backend inside the block; the previous settings after it."""
    saved = [(flag, flag.fp32_precision) for flag in _backends()]
    try:
        for flag, _ in saved:
            flag.fp32_precision = "ieee"
        yield
    finally:
        for flag, value in saved:
            flag.fp32_precision = value
