"""``BlackBox``: a query-only stage (a model behind an API, a subprocess, a solver) inside a model.

It evaluates its callable without autograd, counts queries (one query = one sample), can enforce a
query budget, and raises a clear error if anyone tries to backpropagate through it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class BudgetExceeded(RuntimeError):
    """A :class:`BlackBox` was asked for more queries than its budget allows."""


class NotDifferentiable(RuntimeError):
    """Backpropagation reached a :class:`BlackBox`."""


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out, name):  # noqa: D401 - autograd signature
        ctx.name = name
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotDifferentiable(
            f"BlackBox '{ctx.name}' is query-only and has no gradient: estimate the gradient with a ZO "
            "estimator (core.CGE / core.RGE, or core.input_space_backward for the stages before it)")


class BlackBox(nn.Module):
    """Wrap ``fn`` (tensor [B, ...] -> tensor [B, ...]) as a query-only stage.

    Args:
        fn: the callable; it receives a detached tensor and runs under ``torch.no_grad()``.
        budget: maximum number of queries (samples); a call that would exceed it raises
            :class:`BudgetExceeded` before calling ``fn``, so ``queries`` never passes the budget.
        name: shown in error messages.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, budget: int | None = None,
                 name: str = "blackbox") -> None:
        super().__init__()
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None; got {budget}")
        self.fn, self.budget, self.name = fn, budget, name
        self.queries = 0

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExceeded(f"BlackBox '{self.name}' query budget exhausted: {self.queries} of "
                                 f"{self.budget} used, this call needs {n} more")
        with torch.no_grad():
            out = self.fn(x.detach())
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        self.queries += n
        if torch.is_grad_enabled() and x.requires_grad:
            return _NoBackward.apply(x, out, self.name)
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, budget={self.budget}, queries={self.queries}"
