"""How a student learns (backprop or a ZO estimator) and the measured memory of one training step.

``fo`` and the gradient-filling estimators (``zo-cge``, ``zo-rge``) drive SGD with momentum;
``zo-mezo`` updates the parameters in place from regenerated directions with no gradient buffers
and no optimizer state (MeZO, Malladi et al. 2023): the memory of inference plus one copy of the
parameters (core's MeZO keeps θ₀ to restore it bit-exactly) and one direction tensor.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from applications.edge_kd.counters import peak_bytes


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def units(model: nn.Module) -> list[list[nn.Parameter]]:
    """The student's layers in forward order: each module with parameters, a norm layer joined to the one before."""
    groups: list[list[nn.Parameter]] = []
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and groups:
            groups[-1].extend(own)
        else:
            groups.append(own)
    return groups


def make_estimator(zo, method: str, model: nn.Module, *, plan=None, seed: int):
    """The ZO estimator of ``method`` over the model's trainable parameters (None for ``fo``)."""
    from core.runtime.blocks import make_estimator as build

    return build(zo, method, model, plan=plan, seed=seed, params=trainable(model))


def make_optimizer(optim, model: nn.Module, method: str, lr_scale: Callable[[], float]):
    """(SGD with momentum, its schedule) for fo/zo-cge/zo-rge; (None, None) for MeZO's in-place update.

    The schedule multiplies ``optim.lr`` by ``lr_scale()`` at every step (progress through the
    epochs, so a run whose epochs shrink — samples dropped — still follows its cosine).
    """
    if method == "zo-mezo":
        return None, None
    opt = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                          weight_decay=optim.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_scale())


def make_plan(zo, model: nn.Module, method: str, ratios: dict[str, float] | None, *, refresh_steps: int, seed: int):
    from core.sparsity import SparsityPlan

    if method not in ("zo-cge", "zo-rge") or not ratios:
        return None
    return SparsityPlan(model, ratios, refresh_every=refresh_steps, seed=seed + 3)


def step_once(model: nn.Module, estimator, optimizer, loss_fn: Callable, x: torch.Tensor, target: Any, *,
              lr: float, weight_decay: float) -> torch.Tensor:
    """One training step outside the experiment loop (the memory probe): backprop, ZO + SGD, or MeZO."""
    if optimizer is None:                                          # MeZO: estimate, then update in place
        loss = estimator.estimate(loss_fn, x, target)
        estimator.step(lr, weight_decay)
        return loss
    optimizer.zero_grad(set_to_none=True)
    if estimator is None:
        loss = loss_fn(model(x), target)
        loss.backward()
    else:
        loss = estimator.backward(loss_fn, x, target)
    optimizer.step()
    return loss.detach()


def step_memory(spec: dict[str, Any], method: str, loss_fn: Callable, x: torch.Tensor, target: tuple, *, zo, optim,
                seed: int = 0, steps: int = 2) -> int:
    """Measured peak bytes of training a freshly built ``spec`` student for ``steps`` steps on one batch.

    Everything the training needs is allocated inside the measured call — weights, gradients,
    optimizer state, the batch, activations, estimator copies and directions — so the number is the
    training memory of the step (fp32). CGE/RGE use random masks at ``zo.sparsity``. The caller's
    RNG state is left as it was.
    """
    from core.models import from_spec
    from core.sparsity import random_ratios

    def run() -> None:
        model = from_spec(spec).to(x.device).train()
        xb = x.clone()
        tb = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in target)
        ratios = random_ratios(model, zo.sparsity) if zo.sparsity > 0 else None
        plan = make_plan(zo, model, method, ratios, refresh_steps=1, seed=seed)
        estimator = make_estimator(zo, method, model, plan=plan, seed=seed)
        optimizer, _ = make_optimizer(optim, model, method, lambda: 1.0)
        for _ in range(steps):
            step_once(model, estimator, optimizer, loss_fn, xb, tb, lr=optim.lr, weight_decay=optim.weight_decay)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        run()                                   # warm-up: one-time allocations (fx tracing, kernels) stay out
        return peak_bytes(run)
