"""Config blocks every application embeds (ZO, optimizer/schedule, run), and what they build.

An application's schema is a dataclass with its own blocks (data, model, ...) plus these::

    @dataclass
    class MyConfig:
        data: MyData = field(default_factory=MyData)
        zo: ZOConfig = field(default_factory=ZOConfig)
        optim: OptimConfig = field(default_factory=OptimConfig)
        run: RunConfig = field(default_factory=RunConfig)

        def validate(self) -> None:
            validate_blocks(self, methods=("zo-cge", "zo-rge", "fo"))

:func:`validate_blocks` is the one validation of these keys; :func:`make_estimator`,
:func:`make_optimizer` and :func:`sparsity_ratios` turn them into objects, identically in every app.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from core.runtime.config import check_choice
from core.runtime.errors import UserError

ZO_METHODS = ("zo-cge", "zo-rge", "zo-mezo")
DISTRIBUTIONS = ("gaussian", "sphere")


@dataclass
class ZOConfig:
    mu: float = 5e-3                       # finite-difference step
    central: bool = False                  # CGE central difference
    q: int = 0                             # RGE/MeZO directions (0 = number of parameters for RGE, 1 for MeZO)
    distribution: str = "gaussian"         # RGE: gaussian | sphere
    sparsity: float = 0.9                  # fraction of conv/linear weight coordinates without a ZO gradient
    ratios: str = "zo-grasp"               # zo-grasp | random | magnitude | path to a ratios JSON
    refresh_epochs: int = 1                # redraw the random masks every N epochs
    grasp_q: int = 192                     # ZO-GraSP directions
    grasp_per_class: int = 25              # ZO-GraSP images per class
    chunk: int = 0                         # fast CGE engine perturbations per batch (0 = automatic)
    objective_batch: int = 32              # parameter sets per call of a batched objective (solver rollouts)


@dataclass
class OptimConfig:
    method: str = "zo-cge"                 # zo-cge | zo-rge | zo-mezo | fo (an app may allow a subset or more)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    warmup_epochs: int = 1                 # linear warm-up, then cosine decay to 0


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "cpu"                    # cpu | cuda | cuda:N | auto
    checkpoint_dir: str = ""               # "" = runs/<app> under the project root; relative = to the root
    run_name: Optional[str] = None         # MLflow run name (default: chosen by the app)
    experiment: Optional[str] = None       # MLflow experiment (default: deepzero/<app>)


# keys that may change when a run is resumed: they change neither the saved state nor what the steps
# already computed; more epochs stretch the cosine schedule to the new total (a warm continuation)
RESUME_SAFE_KEYS = ("optim.epochs", "run.device", "run.run_name", "run.checkpoint_dir")


def validate_blocks(cfg: Any, *, methods: tuple[str, ...] = (*ZO_METHODS, "fo")) -> None:
    """Check the shared blocks of ``cfg`` (attributes ``zo``, ``optim``, ``run``; each optional)."""
    zo, optim, run = getattr(cfg, "zo", None), getattr(cfg, "optim", None), getattr(cfg, "run", None)
    if optim is not None:
        check_choice("optim.method", optim.method, methods)
        _at_least(1, {"optim.epochs": optim.epochs})
        _at_least(0, {"optim.warmup_epochs": optim.warmup_epochs})
        if not optim.lr > 0:
            raise UserError(f"config key 'optim.lr' must be > 0; got {optim.lr}")
        if optim.momentum < 0 or optim.weight_decay < 0:
            raise UserError("config keys 'optim.momentum' and 'optim.weight_decay' must be >= 0")
    if zo is not None:
        check_choice("zo.distribution", zo.distribution, DISTRIBUTIONS)
        if not zo.mu > 0:
            raise UserError(f"config key 'zo.mu' must be > 0; got {zo.mu}")
        if not 0.0 <= zo.sparsity < 1.0:
            raise UserError(f"config key 'zo.sparsity' must be in [0, 1); got {zo.sparsity}")
        _at_least(1, {"zo.refresh_epochs": zo.refresh_epochs, "zo.grasp_q": zo.grasp_q,
                      "zo.grasp_per_class": zo.grasp_per_class, "zo.objective_batch": zo.objective_batch})
        _at_least(0, {"zo.q": zo.q, "zo.chunk": zo.chunk})
    if run is not None and run.experiment is not None and not run.experiment.strip():
        raise UserError("config key 'run.experiment' must be a non-empty name (or null for deepzero/<app>)")


def _at_least(low: int, values: dict[str, int]) -> None:
    for key, value in values.items():
        if value < low:
            raise UserError(f"config key '{key}' must be >= {low}; got {value}")


def make_estimator(zo: ZOConfig, method: str, model, *, plan=None, seed: int = 0, params=None):
    """The ZO estimator ``method`` names (None for ``fo``), configured from the ``zo`` block.

    RGE's default q is the number of owned parameters (the same queries per step as dense CGE);
    MeZO's is 1, and it runs the model at inference memory (``lean=True``: BatchNorm and ReLU in
    place, convolutions on batch slices). Each estimator's own generator is seeded from ``seed`` so
    runs are reproducible.
    """
    from core import CGE, RGE, MeZO

    if method == "zo-cge":
        return CGE(model, mu=zo.mu, central=zo.central, sparsity=plan, chunk=zo.chunk or None, params=params,
                   objective_batch=zo.objective_batch)
    if method == "zo-rge":
        q = zo.q or sum(p.numel() for p in (params or model.parameters()) if p.requires_grad)
        return RGE(model, q=q, mu=zo.mu, distribution=zo.distribution, sparsity=plan, seed=seed + 1, params=params,
                   objective_batch=zo.objective_batch)
    if method == "zo-mezo":
        return MeZO(model, mu=zo.mu, q=zo.q or 1, sparsity=plan, seed=seed + 2, params=params,
                    objective_batch=zo.objective_batch, lean=True)
    return None


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(optim: OptimConfig, params, steps_per_epoch: int, *, kind: str = "sgd"):
    """SGD with momentum (or Adam: ``kind="adam"``) and weight decay; linear warm-up then cosine decay,
    stepped once per step."""
    import torch

    if kind == "adam":
        opt = torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    total, warm = optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm))
    return opt, sched


def sparsity_ratios(zo: ZOConfig, model, loss_fn, x, y, *, seed: int) -> dict[str, float] | None:
    """Layer-wise pruning ratios from ZO-GraSP (on the batch ``x, y``), a baseline, or a ratios file.

    None when ``zo.sparsity`` is 0 (dense). ``x, y`` are only used by ZO-GraSP.
    """
    from core.sparsity import load_ratios, magnitude_ratios, random_ratios, zo_grasp_ratios

    if zo.sparsity == 0.0:
        return None
    if zo.ratios == "random":
        return random_ratios(model, zo.sparsity)
    if zo.ratios == "magnitude":
        return magnitude_ratios(model, zo.sparsity)
    if zo.ratios == "zo-grasp":
        import torch

        gen = torch.Generator().manual_seed(seed + 17)
        return zo_grasp_ratios(model, loss_fn, x, y, zo.sparsity, q=zo.grasp_q, mu=zo.mu, generator=gen)
    return load_ratios(zo.ratios, model)


def ratio_table(model, ratios: dict[str, float]) -> list[dict[str, Any]]:
    """Rows (layer, params, pruned_ratio, active) of a ratios mapping, for a TSV artifact."""
    params = dict(model.named_parameters())
    return [{"layer": name, "params": params[name].numel(), "pruned_ratio": round(r, 4),
             "active": params[name].numel() - round(r * params[name].numel())} for name, r in ratios.items()]
