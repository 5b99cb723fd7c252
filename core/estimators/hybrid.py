"""Hybrid first-/zeroth-order training: white-box parameters by autograd, the rest by ZO estimators."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from core.estimators.base import ZOEstimator


class Hybrid:
    """Combine ZO estimators (each owning some parameters) with backprop for ``fo_params``.

    The autograd pass runs with the ZO-owned parameters frozen, so no gradient is computed for them;
    then each ZO estimator fills its own parameters' ``.grad``. ``queries`` sums the ZO estimators.

    Example::

        head = list(model.head.parameters())
        body = [p for p in model.parameters() if all(p is not h for h in head)]
        hy = Hybrid(model, zo=[CGE(model, params=body)], fo_params=head)
        loss = hy.backward(F.cross_entropy, x, y)
    """

    def __init__(self, model: nn.Module, *, zo: Sequence[ZOEstimator], fo_params: Iterable[nn.Parameter]) -> None:
        self.model, self.zo, self.fo_params = model, list(zo), list(fo_params)
        owned = [id(p) for est in self.zo for _, p in est.named_params]
        if len(owned) != len(set(owned)) or set(owned) & {id(p) for p in self.fo_params}:
            raise ValueError("each parameter must belong to exactly one estimator (or to fo_params)")

    @property
    def queries(self) -> int:
        return sum(est.queries for est in self.zo)

    def backward(self, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        zo_params = [p for est in self.zo for _, p in est.named_params]
        flags = [p.requires_grad for p in zo_params]
        for p in zo_params:
            p.requires_grad_(False)
        try:
            for p in self.fo_params:
                p.grad = None
            loss = loss_fn(self.model(x), y)
            loss.backward()
        finally:
            for p, f in zip(zo_params, flags):
                p.requires_grad_(f)
        for est in self.zo:
            est.backward(loss_fn, x, y)
        return loss.detach()
