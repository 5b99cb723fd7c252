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
        max_batch: the most samples ``fn`` accepts per call (an API limit, a device's memory);
            larger inputs are split into consecutive chunks of at most ``max_batch`` samples and
            the outputs concatenated along dim 0. The budget is checked for the whole input first.

    The query counter (and budget) travel in checkpoints through :meth:`query_state` /
    :meth:`load_query_state`; ``state_dict()`` stays the ordinary ``nn.Module`` one (the wrapped
    module's weights, if ``fn`` is a module).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, budget: int | None = None,
                 name: str = "blackbox", max_batch: int | None = None) -> None:
        super().__init__()
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None; got {budget}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise ValueError(f"max_batch must be an int >= 1 or None; got {max_batch!r}")
        self.fn, self.budget, self.name, self.max_batch = fn, budget, name, max_batch
        self.queries = 0

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch._C._functorch.is_batchedtensor(x):
            # under torch.vmap a call would see (and count) one slice for K stacked evaluations
            raise RuntimeError(f"BlackBox '{self.name}' cannot run under torch.vmap: it is queried on real batches")
        n = int(x.shape[0])
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExceeded(f"BlackBox '{self.name}' query budget exhausted: {self.queries} of "
                                 f"{self.budget} used, this call needs {n} more")
        xd = x.detach()
        size = self.max_batch or max(n, 1)
        outs = []
        with torch.no_grad():
            for chunk in [xd[s:s + size] for s in range(0, n, size)] or [xd]:   # chunks of <= max_batch
                out = self.fn(chunk)
                outs.append(torch.as_tensor(out, device=xd.device))     # NumPy, or another device: beside x
                self.queries += int(chunk.shape[0])
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if torch.is_grad_enabled() and x.requires_grad:
            return _NoBackward.apply(x, out, self.name)
        return out

    def query_state(self) -> dict[str, int | None]:
        """``{"queries": int, "budget": int | None}`` for a run-state checkpoint."""
        return {"queries": int(self.queries), "budget": self.budget}

    def load_query_state(self, state: dict[str, int | None], *, budget: bool = True) -> None:
        """Restore the counter from :meth:`query_state` so a resumed run keeps its spent queries.

        Args:
            state: what :meth:`query_state` returned.
            budget: also restore the saved budget; ``False`` keeps this box's own budget (e.g. a
                resume that raises the budget on purpose).
        """
        queries = state["queries"]
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 0:
            raise ValueError(f"query state of BlackBox '{self.name}': queries must be an int >= 0; "
                             f"got {queries!r}")
        if budget:
            saved = state.get("budget")
            if saved is not None and (isinstance(saved, bool) or not isinstance(saved, int) or saved < 0):
                raise ValueError(f"query state of BlackBox '{self.name}': budget must be an int >= 0 or "
                                 f"None; got {saved!r}")
            self.budget = saved
        self.queries = queries

    def extra_repr(self) -> str:
        return f"name={self.name!r}, budget={self.budget}, queries={self.queries}, max_batch={self.max_batch}"


def module_device(module: nn.Module) -> torch.device | None:
    """Where ``module``'s tensors live (None: it has none)."""
    first = next(iter(module.parameters()), None)
    first = next(iter(module.buffers()), None) if first is None else first
    return None if first is None else first.device


def on_input_device(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` as a query function that runs on its input's device: the module moves there when
    the input's device changes (a query-only model asked from a GPU run and from CPU evaluations)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        device = module_device(module)
        if device is not None and device != x.device:
            module.to(x.device)
        return module(x)

    return run
