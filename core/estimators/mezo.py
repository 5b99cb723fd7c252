"""MeZO: memory-efficient SPSA with directions regenerated from a seed (Malladi et al., NeurIPS 2023).

Per step and direction r, with z_r ~ N(0, I) regenerated from a seed, never stored:

    θ ← θ + μz;  ℓ₊ = ℓ(θ);  θ ← θ − 2μz;  ℓ₋ = ℓ(θ);  θ ← θ + μz
    c_r = (ℓ₊ − ℓ₋) / (2μ);      ĝ = (1/q) Σ_r c_r · z_r

Draw plan: parameter i's direction comes from its own generator seeded with (step seed, r, i)
and drawn with the parameter's full shape, so the perturbation, the restore and the update
draw exactly the same numbers whatever the other parameters are (a shared stream would depend on
the shapes and order of every draw). Masked coordinates are zeroed after the draw.

Memory: at most one direction tensor of one parameter is alive at a time. ``step(lr)`` applies
the SGD update in place without gradients (memory ≈ inference); ``backward`` fills ``p.grad``
for use with any torch optimizer. The in-place restore drifts by float rounding
(~5e-7 in float32, ~2e-2 in bfloat16).
Queries per step: 2q·B (the returned loss is (ℓ₊ + ℓ₋)/2 of the first direction, which costs nothing).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.estimators.base import Objective, ZOEstimator, frozen_buffers


class MeZO(ZOEstimator):
    def __init__(self, model: nn.Module, mu: float = 1e-3, *, q: int = 1, sparsity: Any = None,
                 params: Iterable[nn.Parameter] | None = None, sign: bool = False, seed: int | None = None) -> None:
        super().__init__(model, params=params, sparsity=sparsity, sign=sign)
        if not mu > 0 or q < 1:
            raise ValueError(f"need mu > 0 and q >= 1; got mu={mu}, q={q}")
        self.mu, self.q = float(mu), int(q)
        self.seed = int(torch.randint(0, 2**31, (1,)).item()) if seed is None else int(seed)
        self.step_count = 0
        self._coefs: list[tuple[int, float]] = []  # (direction seed, c_r) of the last backward

    def _direction(self, dseed: int, i: int, p: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g = torch.Generator(device=p.device).manual_seed((dseed * 1_000_003 + i) % (2**63 - 1))
        z = torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device)
        return z.mul_(mask) if mask is not None else z

    def _perturb(self, dseed: int, scale: float, masks: dict[str, torch.Tensor]) -> None:
        for i, (name, p) in enumerate(self.named_params):
            p.data.add_(self._direction(dseed, i, p, masks.get(name)), alpha=scale)

    def estimate(self, loss_fn: Objective, x=None, y=None) -> torch.Tensor:
        """Evaluate the q SPSA differences; remember (seed, c_r). Returns the loss estimate."""
        masks = self.masks()
        self._coefs = []
        loss = None
        with torch.no_grad(), frozen_buffers(self.model):
            for r in range(self.q):
                dseed = (self.seed * 7_919 + self.step_count) * 131 + r
                self._perturb(dseed, self.mu, masks)
                plus = self._evaluate(loss_fn, x, y)
                self._perturb(dseed, -2 * self.mu, masks)
                minus = self._evaluate(loss_fn, x, y)
                self._perturb(dseed, self.mu, masks)
                self._coefs.append((dseed, float((plus - minus) / (2 * self.mu))))
                if loss is None:
                    loss = (plus + minus) / 2
        self.step_count += 1
        return loss

    def backward(self, loss_fn: Objective, x: torch.Tensor | None = None,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.estimate(loss_fn, x, y)
        masks = self.masks()
        for i, (name, p) in enumerate(self.named_params):
            g = torch.zeros_like(p)
            for dseed, c in self._coefs:
                g.add_(self._direction(dseed, i, p, masks.get(name)), alpha=c / self.q)
            p.grad = torch.sign(g) if self.sign else g
        return loss

    @torch.no_grad()
    def step(self, lr: float, weight_decay: float = 0.0) -> None:
        """In-place ZO-SGD update θ ← θ − lr·(ĝ + wd·θ) from the last ``estimate``, no gradient memory."""
        masks = self.masks()
        for i, (name, p) in enumerate(self.named_params):
            if weight_decay:
                p.mul_(1 - lr * weight_decay)
            for dseed, c in self._coefs:
                p.add_(self._direction(dseed, i, p, masks.get(name)), alpha=-lr * c / self.q)

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "seed": self.seed, "step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries, self.seed, self.step_count = int(state["queries"]), int(state["seed"]), int(state["step_count"])
