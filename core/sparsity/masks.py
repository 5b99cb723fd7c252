"""Layer-wise pruning ratios and the "sparse gradient, dense model" mask plan (DeepZero §4).

Ratios map a parameter name to the fraction of its coordinates that are *pruned* (get no ZO
gradient). By default only conv/linear weights (tensors with ≥ 2 dims) are prunable; BatchNorm
parameters and biases stay dense. Every ``refresh_every`` steps the plan draws a fresh random mask
per layer keeping exactly ``round((1 − ratio)·n)`` coordinates; the weights themselves stay dense.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn



def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv/linear weights: the parameters ZO-GraSP scores and the plan masks."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}


def _global_ratios(model: nn.Module, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Prune the globally highest-scoring fraction ``sparsity``; return the per-layer fractions."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])
    k = int(round(sparsity * flat.numel()))
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        pruned[torch.topk(flat, k, largest=True, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        # every layer keeps at least one coordinate (a layer pruned whole would never train again;
        # ties, e.g. a zero-initialised layer whose scores are all 0, can otherwise remove it)
        out[n] = min(float(pruned[start:start + size].sum()), size - 1) / size
        start += size
    return out


def random_ratios(model: nn.Module, sparsity: float) -> dict[str, float]:
    """Random pruning baseline: the same ratio in every prunable layer."""
    return {n: float(sparsity) for n in prunable(model)}


def magnitude_ratios(model: nn.Module, sparsity: float) -> dict[str, float]:
    """Global magnitude pruning baseline: prune the smallest |θ| over all prunable layers."""
    return _global_ratios(model, {n: -p.detach().abs() for n, p in prunable(model).items()}, sparsity)


def save_ratios(path: str | Path, ratios: dict[str, float], meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ratios": ratios, **(meta or {})}, indent=2, sort_keys=True))
    return path


def load_ratios(path: str | Path, model: nn.Module | None = None) -> dict[str, float]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        ratios = {str(k): float(v) for k, v in data["ratios"].items()}
    except FileNotFoundError:
        raise FileNotFoundError(f"ratios file {path} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"ratios file {path} is not a deepzero ratios file (JSON with a 'ratios' mapping)") from None
    if model is not None:
        names = dict(model.named_parameters())
        unknown = [k for k in ratios if k not in names]
        if unknown:
            raise ValueError(f"ratios file {path} names parameters this model lacks: {', '.join(unknown[:5])}")
    bad = {k: v for k, v in ratios.items() if not 0.0 <= v < 1.0}
    if bad:
        raise ValueError(f"ratios in {path} must be in [0, 1); got {bad}")
    return ratios


class SparsityPlan:
    """Fresh random per-layer masks at fixed layer-wise ratios, redrawn every ``refresh_every`` steps.

    Args:
        model: the model (masks are built for its named parameters).
        ratios: parameter name -> pruned fraction; other parameters are dense.
        refresh_every: steps between redraws (call :meth:`step` once per optimizer step).
        seed: seeds the plan's generator (masks are reproducible and resumable).
    """

    def __init__(self, model: nn.Module, ratios: dict[str, float], *, refresh_every: int = 1,
                 seed: int = 0) -> None:
        params = dict(model.named_parameters())
        for name, r in ratios.items():
            if name not in params:
                raise ValueError(f"ratio given for unknown parameter {name!r}")
            if not 0.0 <= r < 1.0:
                raise ValueError(f"ratio for {name!r} must be in [0, 1); got {r}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1; got {refresh_every}")
        self.shapes = {n: params[n].shape for n in ratios}
        self.devices = {n: params[n].device for n in ratios}
        self.ratios = dict(ratios)
        self.refresh_every = refresh_every
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self._masks: dict[str, torch.Tensor] = {}
        self._draw()

    def _draw(self) -> None:
        self._masks = {}
        for name, shape in self.shapes.items():
            n = shape.numel()
            keep = n - int(round(self.ratios[name] * n))
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=self.generator)[:keep]] = True
            self._masks[name] = mask.reshape(shape).to(self.devices[name])

    def masks(self) -> dict[str, torch.Tensor]:
        return self._masks

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.refresh_every == 0:
            self._draw()

    def density(self, model: nn.Module) -> float:
        """Fraction of all trainable coordinates that are active."""
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pruned = sum(int((~m).sum()) for m in self._masks.values())
        return 1.0 - pruned / total

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "generator": self.generator.get_state(), "ratios": self.ratios,
                "masks": {n: m.cpu() for n, m in self._masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self.ratios = {k: float(v) for k, v in state["ratios"].items()}
        self._masks = {n: m.to(self.devices[n]) for n, m in state["masks"].items()}
