"""ZO-GraSP: pruning at initialisation with finite differences only (DeepZero, Chen et al. 2024, §4).

GraSP (Wang et al., ICLR 2020) scores weights by S = −θ ⊙ Hg (H the Hessian, g the gradient)
and removes the highest scores. Without gradients:

    g0 = RGE(θ)                      with directions u_1..u_q
    g1 = RGE(θ + μ·g0)               with the SAME directions (common random numbers)
    Hg ≈ (g1 − g0) / μ,   S = −θ ⊙ Hg

Using the same u_i for g0 and g1 makes their difference a finite difference of one estimator
instead of the difference of two independent noisy estimates (deviation from the public code,
which draws fresh directions and so mostly measures noise). Only the resulting layer-wise
pruning ratios are kept: sparse-CGE training draws random masks at those ratios.
Paper defaults: q = 192, μ = 5e-3, 25 images per class.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from core.estimators.base import frozen_buffers, restore_on_error
from core.estimators.precision import ieee_float32
from core.sparsity.masks import _global_ratios, prunable


def _rge(model: nn.Module, loss: Callable[[], torch.Tensor], params: list[nn.Parameter],
         directions: list[list[torch.Tensor]], mu: float) -> list[torch.Tensor]:
    """Gaussian RGE over ``params`` with the given directions (list over q of per-param tensors)."""
    f0 = loss()
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for u in directions:
        originals = [p.detach().clone() for p in params]
        for p, ui in zip(params, u):
            p.data.add_(ui, alpha=mu)
        coef = float(loss() - f0) / mu
        for p, o in zip(params, originals):
            p.data.copy_(o)
        for a, ui in zip(acc, u):
            a.add_(ui.double(), alpha=coef)
    return [(a / len(directions)).to(p.dtype) for a, p in zip(acc, params)]


@torch.no_grad()
def zo_grasp_scores(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *, q: int = 192,
                    mu: float = 5e-3, generator: torch.Generator | None = None,
                    common_random_numbers: bool = True) -> dict[str, torch.Tensor]:
    """GraSP scores −θ ⊙ Hg of every prunable weight, from 2q + 2 loss evaluations.

    The weights are perturbed in place and restored exactly; an exception in the middle (a black
    box's budget, Ctrl-C) restores every weight and buffer before it propagates.
    """
    named = prunable(model)
    params = list(named.values())

    def loss() -> torch.Tensor:
        return loss_fn(model(x), y)

    def draw() -> list[list[torch.Tensor]]:
        return [[torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
                for _ in range(q)]

    with restore_on_error(model, params), frozen_buffers(model), ieee_float32():
        dirs = draw()
        g0 = _rge(model, loss, params, dirs, mu)
        originals = [p.detach().clone() for p in params]
        for p, g in zip(params, g0):
            p.data.add_(g, alpha=mu)
        g1 = _rge(model, loss, params, dirs if common_random_numbers else draw(), mu)
        for p, o in zip(params, originals):
            p.data.copy_(o)
    return {n: -(p.detach() * (b - a) / mu) for (n, p), a, b in zip(named.items(), g0, g1)}


def zo_grasp_ratios(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, sparsity: float, *,
                    q: int = 192, mu: float = 5e-3,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """Layer-wise pruning ratios whose size-weighted mean is ``sparsity``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    scores = zo_grasp_scores(model, loss_fn, x, y, q=q, mu=mu, generator=generator)
    return _global_ratios(model, scores, sparsity)
