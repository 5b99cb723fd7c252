"""The K losses of K perturbed outputs at once, each exactly what ``loss_fn(output_k, y)`` gives.

Three paths, chosen per loss function, never by catching an arbitrary error:

1. **closed-form cross-entropy** — only for exactly what it reproduces: ``F.cross_entropy`` itself or
   a plain ``nn.CrossEntropyLoss()`` (no class weights, no label smoothing, mean reduction, the
   default ``ignore_index`` with no label equal to it), on logits [B, C] and class indices [B]:
   ℓ_k = mean_b [logsumexp(z_kb) − z_kb,y_b];
2. **torch.vmap** of ``loss_fn`` over the K outputs, if on its first chunk vmap runs and agrees with
   the per-perturbation loop (vmap raises for data-dependent control flow or ``.item()``, and a
   stateful loss may silently differ);
3. the **per-perturbation loop** otherwise. A genuine error of ``loss_fn`` shows up there, so the
   vmap attempt hides nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# what torch.vmap raises for a function it cannot batch (no batching rule, control flow on a
# batched value, .item(), a non-tensor result); anything else is a bug of loss_fn and propagates
_VMAP_ERRORS = (RuntimeError, NotImplementedError, ValueError)


def is_plain_cross_entropy(loss_fn: Callable) -> bool:
    """``F.cross_entropy`` or an ``nn.CrossEntropyLoss`` with every option at its default."""
    if loss_fn is F.cross_entropy:
        return True
    return (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean"
            and loss_fn.label_smoothing == 0.0 and loss_fn.ignore_index == -100)


class BatchedLoss:
    """``losses(out, y)`` -> [K] for perturbed outputs ``out`` [K, B, ...]; see the module docstring.

    ``prepare`` is called once per estimate with the unperturbed output; ``path`` says what was chosen
    (``"cross_entropy"``, ``"vmap"``, ``"loop"``, or ``None`` before the first chunk decided).
    """

    def __init__(self) -> None:
        self.loss_fn: Callable | None = None
        self.path: str | None = None

    def prepare(self, loss_fn: Callable, out: torch.Tensor, y: Any) -> None:
        if (out.dim() == 2 and isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point()
                and not y.is_complex() and out.is_floating_point() and is_plain_cross_entropy(loss_fn)
                and bool((y >= 0).all())):
            self.loss_fn, self.path = loss_fn, "cross_entropy"
        elif loss_fn is not self.loss_fn or self.path == "cross_entropy":
            self.loss_fn, self.path = loss_fn, None      # a new function: decide vmap on its first chunk

    def __call__(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        if self.path == "cross_entropy":
            picked = out.gather(2, y.view(1, -1, 1).expand(out.shape[0], -1, 1)).squeeze(2)   # [K, B]
            return (torch.logsumexp(out, dim=2) - picked).mean(1)
        if self.path == "vmap":
            return torch.vmap(self.loss_fn, in_dims=(0, None))(out, y).reshape(-1)
        loop = torch.stack([self.loss_fn(out[k], y).reshape(()) for k in range(out.shape[0])])
        if self.path is None:
            self.path = "vmap" if self._vmap_agrees(out, y, loop) else "loop"
        return loop

    def _vmap_agrees(self, out: torch.Tensor, y: Any, loop: torch.Tensor) -> bool:
        try:
            batched = torch.vmap(self.loss_fn, in_dims=(0, None))(out, y)
        except _VMAP_ERRORS:
            return False
        if not isinstance(batched, torch.Tensor) or batched.numel() != loop.numel() \
                or batched.dtype != loop.dtype:
            return False
        batched = batched.reshape(-1)
        if not loop.is_floating_point():
            return torch.equal(batched, loop)
        tol = 64 * torch.finfo(loop.dtype).eps          # batched reductions may sum in another order
        scale = float(loop.abs().max())
        return bool(torch.allclose(batched, loop, rtol=tol, atol=tol * scale, equal_nan=True))
