"""RGE: randomized (vector-wise) gradient estimation (DeepZero, Chen et al., ICLR 2024, Eq. 2).

With q directions u_i over the d active coordinates:

    Gaussian u ~ N(0, I):   ĝ = (1/q) Σ_i [ℓ(θ + μu_i) − ℓ(θ)] / μ · u_i
    unit sphere u:          ĝ = (d/q) Σ_i [ℓ(θ + μu_i) − ℓ(θ)] / μ · u_i

so that E[ĝ] → ∇ℓ as μ → 0 (for the sphere, E[u uᵀ] = I/d, hence the factor d).
Antithetic pairs replace the difference by [ℓ(θ + μu_i) − ℓ(θ − μu_i)] / (2μ).
Queries per step on a batch of B: (q + 1)·B, or (2q + 1)·B antithetic (with a general or
batched objective, B is the objective's declared queries per evaluation).

A general objective ``objective(model)`` is evaluated once per direction with θ perturbed in
place (and restored exactly); a batched objective ``objective(model, params)`` receives the q
perturbed sets ``objective_batch`` at a time, the unperturbed θ being row 0 of the first call.

Deviation from the public DeepZero code: it omits the factor d (and 1/μ in places), which
leaves the estimate with the right direction on average but the wrong scale; we keep the
unbiased scaling above.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.estimators.base import Snapshot, ZOEstimator, frozen_buffers
from core.estimators.objectives import ObjectiveCall

DISTRIBUTIONS = ("gaussian", "sphere")


class RGE(ZOEstimator):
    """Randomized gradient estimator.

    Args:
        model: the model.
        q: number of random directions per step.
        mu: smoothing radius μ.
        distribution: ``"gaussian"`` or ``"sphere"``.
        antithetic: evaluate ±μu (central difference) for each direction.
        seed: seeds the estimator's own generator (default: drawn from torch's global RNG).
        sparsity, params, sign, objective_batch: as in :class:`core.estimators.base.ZOEstimator`.
    """

    def __init__(self, model: nn.Module, q: int = 1, mu: float = 5e-3, *, distribution: str = "gaussian",
                 antithetic: bool = False, sparsity: Any = None, params: Iterable[nn.Parameter] | None = None,
                 sign: bool = False, seed: int | None = None, objective_batch: int = 32) -> None:
        super().__init__(model, params=params, sparsity=sparsity, sign=sign, objective_batch=objective_batch)
        if q < 1:
            raise ValueError(f"q must be >= 1; got {q}")
        if not mu > 0:
            raise ValueError(f"mu must be > 0; got {mu}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}")
        self.q, self.mu, self.distribution, self.antithetic = int(q), float(mu), distribution, antithetic
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """One direction split per owned parameter (flat, active coordinates only)."""
        u = torch.randn(sum(sizes), generator=self.generator, dtype=torch.float64)
        if self.distribution == "sphere":
            u = u / u.norm().clamp_min(1e-30)
        return list(torch.split(u.to(dtype), sizes))

    def _backward(self, call: ObjectiveCall, snapshot: Snapshot) -> torch.Tensor:
        del snapshot   # θ is restored from the saved active coordinates; the snapshot serves on errors
        active = self.active_indices()
        sizes = [int(i.numel()) for i in active]
        d = sum(sizes)
        params = self.params()
        acc = [torch.zeros(n, dtype=torch.float64, device=p.device) for n, p in zip(sizes, params)]
        rng = self.generator.get_state()
        try:
            if call.kind == "batched":
                loss0 = self._estimate_batched(call, active, sizes, acc)
            else:
                loss0 = self._estimate_inplace(call, active, sizes, acc)
        except BaseException:
            self.generator.set_state(rng)   # an interrupted step, retried, draws the same directions
            raise
        scale = (d if self.distribution == "sphere" else 1.0) / self.q
        grads = []
        for p, idx, a in zip(params, active, acc):
            g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            g[idx] = (a * scale).to(p.dtype)
            grads.append(g)
        self._set_grads(grads)
        return loss0

    def _directions(self, sizes: list[int]) -> list[torch.Tensor]:
        params = self.params()
        return [t.to(p.device) for t, p in zip(self.draw(sizes, params[0].dtype), params)]

    def _estimate_inplace(self, call: ObjectiveCall, active, sizes, acc) -> torch.Tensor:
        """One evaluation per direction (two antithetic), perturbing θ in place and restoring it."""
        params = self.params()
        loss0 = self._evaluate(call)
        originals = [p.data.view(-1)[idx].clone() for p, idx in zip(params, active)]
        with torch.no_grad(), frozen_buffers(self.model):
            for _ in range(self.q):
                u = self._directions(sizes)
                for p, idx, orig, ui in zip(params, active, originals, u):
                    p.data.view(-1)[idx] = orig + self.mu * ui
                plus = self._evaluate(call)
                if self.antithetic:
                    for p, idx, orig, ui in zip(params, active, originals, u):
                        p.data.view(-1)[idx] = orig - self.mu * ui
                    coef = (plus - self._evaluate(call)).double() / (2 * self.mu)
                else:
                    coef = (plus - loss0).double() / self.mu
                for p, idx, orig in zip(params, active, originals):
                    p.data.view(-1)[idx] = orig
                for a, ui in zip(acc, u):
                    a.add_(ui.double(), alpha=float(coef))
        return loss0

    def _estimate_batched(self, call: ObjectiveCall, active, sizes, acc) -> torch.Tensor:
        """The q perturbed sets (2q antithetic) go ``objective_batch`` per call; θ is row 0 of the first.

        The directions are drawn in the same order as the in-place path, so both give the same
        estimate up to the rounding of the objective itself.
        """
        signs = (1.0, -1.0) if self.antithetic else (1.0,)
        pending: list[list[torch.Tensor]] = []

        def fill(g0: int, g1: int, rows: list[torch.Tensor]) -> None:
            pending.clear()
            for r in range(g1 - g0):
                u = self._directions(sizes)
                pending.append(u)
                for i, (idx, ui) in enumerate(zip(active, u)):
                    step = self.mu * ui
                    for s, sign in enumerate(signs):
                        row = rows[i][r * len(signs) + s]
                        row[idx] = row[idx] + step if sign > 0 else row[idx] - step

        def consume(g0: int, g1: int, losses: torch.Tensor, loss0: torch.Tensor | None) -> None:
            for r, u in enumerate(pending):
                if self.antithetic:
                    coef = (losses[r, 0] - losses[r, 1]).double() / (2 * self.mu)
                else:
                    coef = (losses[r, 0] - loss0).double() / self.mu
                for a, ui in zip(acc, u):
                    a.add_(ui.double(), alpha=float(coef))

        return self._batched(call, self.q, len(signs), fill, consume, base=True)

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries = int(state["queries"])
        self.generator.set_state(state["generator"])
