"""Shared machinery of the ZO estimators: owned parameters, objectives, query counting, BN buffers.

An estimator binds to a model the way ``torch.optim`` binds to parameters. ``backward`` accepts

- a supervised loss: ``backward(loss_fn, x, y)`` with ``loss_fn(model(x), y) -> scalar``;
- a general objective: ``backward(objective)`` with ``objective(model) -> scalar`` (e.g. a PDE
  rollout through a black-box solver);
- a batched objective (decorated with :func:`batched_objective`): ``objective(model, params)``
  where ``params`` maps each owned parameter name to K stacked perturbed values ``[K, *shape]``
  and the objective returns the K losses ``[K]`` at once.

It fills ``p.grad`` for every owned parameter and returns the unperturbed loss (a detached
0-dim tensor). Parameters it does not own keep their ``.grad`` untouched (``None`` if never set);
coordinates outside the active sparsity mask get a gradient of exactly 0.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Objective = Callable[..., torch.Tensor]


def batched_objective(fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
    """Mark ``fn(model, params) -> losses[K]`` as able to evaluate K perturbed parameter sets at once."""
    fn.zo_batched = True  # type: ignore[attr-defined]
    return fn


@contextmanager
def frozen_buffers(model: nn.Module):
    """Restore every buffer (BN running stats, counters) after perturbed evaluations.

    Perturbed forwards must not move running statistics: only the unperturbed forward of a step
    updates them, exactly as one ordinary training forward would.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class ZOEstimator:
    """Base class: which parameters are owned, the sparsity plan and the query counter.

    Args:
        model: the model whose parameters are estimated.
        params: the parameters this estimator owns (default: every parameter with ``requires_grad``).
        sparsity: optional object with ``masks() -> dict[str, BoolTensor]`` (e.g.
            :class:`core.sparsity.SparsityPlan`); parameters absent from the dict are dense.
        sign: replace the estimate by its sign (ZO-SignSGD, Liu et al. 2019).
    """

    def __init__(self, model: nn.Module, *, params: Iterable[nn.Parameter] | None = None,
                 sparsity: Any = None, sign: bool = False) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if params is not None:
            wanted = {id(p) for p in params}
            named = [(n, p) for n, p in named if id(p) in wanted]
        if not named:
            raise ValueError("the estimator owns no trainable parameters (all frozen, or params= matched none)")
        self.named_params: list[tuple[str, nn.Parameter]] = named
        self.sparsity = sparsity
        self.sign = sign
        self.queries = 0

    # -- helpers shared by subclasses ----------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        if self.sparsity is None:
            return {}
        return self.sparsity.masks()

    def active_indices(self) -> list[torch.Tensor]:
        """Flat indices of the active coordinates of each owned parameter."""
        masks = self.masks()
        out = []
        for name, p in self.named_params:
            m = masks.get(name)
            out.append(torch.arange(p.numel(), device=p.device) if m is None
                       else m.reshape(-1).nonzero().squeeze(1).to(p.device))
        return out

    def num_active(self) -> int:
        return sum(int(i.numel()) for i in self.active_indices())

    def _set_grads(self, grads: list[torch.Tensor]) -> None:
        for (_, p), g in zip(self.named_params, grads):
            g = g.reshape(p.shape).to(p.dtype)
            if self.sign:
                g = torch.sign(g)
            p.grad = g

    def _evaluate(self, loss_fn: Objective, x, y) -> torch.Tensor:
        """One evaluation of the loss at the current parameters (counts queries)."""
        with torch.no_grad():
            if x is None:
                loss = loss_fn(self.model)
                self.queries += int(getattr(loss_fn, "zo_queries_per_call", 1))
            else:
                loss = loss_fn(self.model(x), y)
                self.queries += int(x.shape[0])
        return loss.detach().reshape(())

    def backward(self, loss_fn: Objective, x: torch.Tensor | None = None,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries = int(state["queries"])
