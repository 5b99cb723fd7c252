"""Hybrid first-/zeroth-order training: white-box parameters by autograd, the rest by ZO estimators."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from core.estimators.base import ZOEstimator, restore_on_error
from core.estimators.objectives import LossFn, bind_objective


class Hybrid:
    """Combine ZO estimators (each owning some parameters) with backprop for ``fo_params``.

    The autograd pass runs with the ZO-owned parameters frozen, so no gradient is computed for them;
    then each ZO estimator fills its own parameters' ``.grad``. ``queries`` sums the ZO estimators
    (the autograd forward is not counted). Objectives: supervised ``loss_fn(model(x), y)``, general
    ``objective(model)``, or batched ``objective(model, params)`` (its autograd pass evaluates one
    parameter set, the current parameters). An exception anywhere in the step restores every
    parameter and buffer to their values before it.

    Example::

        head = list(model.head.parameters())
        body = [p for p in model.parameters() if all(p is not h for h in head)]
        hy = Hybrid(model, zo=[CGE(model, params=body)], fo_params=head)
        loss = hy.backward(F.cross_entropy, x, y)
    """

    def __init__(self, model: nn.Module, *, zo: Sequence[ZOEstimator],
                 fo_params: Iterable[nn.Parameter]) -> None:
        self.model, self.zo, self.fo_params = model, list(zo), list(fo_params)
        owned = [id(p) for est in self.zo for _, p in est.named_params]
        if len(owned) != len(set(owned)) or set(owned) & {id(p) for p in self.fo_params}:
            raise ValueError("each parameter must belong to exactly one estimator (or to fo_params)")

    @property
    def queries(self) -> int:
        return sum(est.queries for est in self.zo)

    def backward(self, loss_fn: LossFn, x: torch.Tensor | None = None, y: Any = None) -> torch.Tensor:
        """Backprop into ``fo_params``, ZO estimates into the rest; returns the unperturbed loss."""
        call = bind_objective(loss_fn, x, y)
        zo_params = [p for est in self.zo for _, p in est.named_params]
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        with restore_on_error(self.model, list(self.fo_params) + zo_params):
            flags = [p.requires_grad for p in zo_params]
            for p in zo_params:
                p.requires_grad_(False)
            try:
                for p in self.fo_params:
                    p.grad = None
                if call.kind == "supervised":
                    loss = call.fn(self.model(call.x), call.y)
                elif call.kind == "general":
                    loss = call.fn(self.model)
                else:
                    one_set = {n: p.unsqueeze(0) for n, p in trainable.items()}     # K = 1: θ itself
                    loss = call.fn(self.model, one_set).reshape(-1)[0]
                if loss.requires_grad:
                    loss.backward()
            finally:
                for p, f in zip(zo_params, flags):
                    p.requires_grad_(f)
            for est in self.zo:
                est.backward(loss_fn, x, y)
        return loss.detach().reshape(())
