"""MeZO: memory-efficient SPSA with directions regenerated from a seed (Malladi et al., NeurIPS 2023).

Per step and direction r, with z_r ~ N(0, I) regenerated from a seed, never stored:

    θ ← θ₀ + μz;  ℓ₊ = ℓ(θ);  θ ← θ₀ − μz;  ℓ₋ = ℓ(θ);  θ ← θ₀
    c_r = (ℓ₊ − ℓ₋) / (2μ);      ĝ = (1/q) Σ_r c_r · z_r

Draw plan: parameter i's direction for direction r of step t comes from its own generator,
seeded by a splitmix64 hash of (seed, t, r, i), and is drawn with the parameter's full shape, so
the perturbation and the update draw exactly the same numbers whatever the other parameters are
(a shared stream would depend on the shapes and order of every draw), and no two (t, r, i) share
a seed pattern (the former ``(seed·7919 + t)·131 + r`` repeated directions across steps once
q > 131). Masked coordinates are zeroed after the draw.

Deviation from Malladi et al.: they restore θ by adding +μz back, which drifts by float rounding
(~5e-7 per step in float32, ~2e-2 in bfloat16; thousands of coordinates after a few steps). We
keep one copy θ₀ of the owned parameters during the step and restore by copying it: bit-exact.
Memory: parameters + one copy of the owned parameters + one direction tensor of one parameter at
a time — still no activations kept and no gradient buffers for ``step(lr)``.

BatchNorm: perturbed evaluations never move running statistics. When the model is in train mode
and has modules with running statistics, each step also evaluates the unperturbed model once
(outside the frozen buffers) so the running statistics follow training as with any optimizer;
that loss is returned and its B queries counted. Otherwise the returned loss is (ℓ₊ + ℓ₋)/2 of the
first direction, which costs nothing.
Queries per step: 2q·B, plus B for that unperturbed evaluation.

``step(lr)`` applies the SGD update in place without gradients (memory ≈ inference); ``backward``
fills ``p.grad`` for use with any torch optimizer.

Batched objectives ``objective(model, params)`` receive the sets θ₀ ± μz_r as stacked params
(``objective_batch`` sets per call, both signs of a direction in the same call). Memory: that many
copies of the owned parameters per call, which gives up MeZO's memory advantage in exchange for
fewer, larger calls; use a general objective where memory is what matters.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.estimators.base import Snapshot, ZOEstimator, frozen_buffers, has_running_stats, restore_on_error
from core.estimators.objectives import LossFn, ObjectiveCall, bind_objective
from core.estimators.precision import ieee_float32
from core.models.lean import lean_forward

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of splitmix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def direction_seed(seed: int, step: int, r: int, i: int) -> int:
    """Seed of parameter i's direction r at step ``step``: a splitmix64 chain over the four keys (63 bits)."""
    h = 0
    for v in (seed, step, r, i):
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


class MeZO(ZOEstimator):
    """Seeded SPSA estimator (MeZO).

    Args:
        model: the model.
        mu: perturbation scale μ.
        q: directions per step.
        seed: base seed of the directions (default: drawn from torch's global RNG).
        sparsity, params, sign, objective_batch: as in :class:`core.estimators.base.ZOEstimator`.
        lean: run supervised losses through :func:`core.models.lean.lean_forward` (BatchNorm and
            ReLU in place): the step's peak memory drops toward one feature map per block; the
            losses equal ``model(x)``'s up to float rounding.

    Example::

        zo = MeZO(model, mu=1e-3, q=1, seed=0)
        loss = zo.estimate(F.cross_entropy, x, y)   # 2q evaluations, remembers (seed, c_r)
        zo.step(lr=1e-3)                            # θ ← θ − lr·ĝ, directions regenerated
    """

    def __init__(self, model: nn.Module, mu: float = 1e-3, *, q: int = 1, sparsity: Any = None,
                 params: Iterable[nn.Parameter] | None = None, sign: bool = False, seed: int | None = None,
                 objective_batch: int = 32, lean: bool = False) -> None:
        super().__init__(model, params=params, sparsity=sparsity, sign=sign, objective_batch=objective_batch)
        if lean:
            self.forward = functools.partial(lean_forward, model)
        if not mu > 0 or q < 1:
            raise ValueError(f"need mu > 0 and q >= 1; got mu={mu}, q={q}")
        self.mu, self.q = float(mu), int(q)
        self.seed = int(torch.randint(0, 2**31, (1,)).item()) if seed is None else int(seed)
        self.step_count = 0
        self._coefs: list[tuple[int, int, float]] = []  # (step, r, c_r) of the last estimate

    def _direction(self, step: int, r: int, i: int, p: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """z for parameter i, direction r of step ``step``: drawn with p's full shape, masked."""
        g = torch.Generator(device=p.device).manual_seed(direction_seed(self.seed, step, r, i))
        z = torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device)
        return z.mul_(mask) if mask is not None else z

    def _perturb(self, r: int, h: float, masks: dict[str, torch.Tensor], snapshot: Snapshot) -> None:
        """θ ← θ₀ + h·z_r, from the saved θ₀ (so no rounding accumulates)."""
        for i, (name, p) in enumerate(self.named_params):
            z = self._direction(self.step_count, r, i, p, masks.get(name))
            p.copy_(snapshot.saved(i)).add_(z, alpha=h)
            del z   # one direction tensor alive at a time

    def estimate(self, loss_fn: LossFn, x: torch.Tensor | None = None, y: Any = None) -> torch.Tensor:
        """Evaluate the q SPSA differences and remember (step, r, c_r); θ is restored bit-exactly.

        Arguments as in :meth:`ZOEstimator.backward`. Returns the loss (see the module docstring).
        """
        call = bind_objective(loss_fn, x, y)
        with restore_on_error(self.model, self.params()) as snapshot, ieee_float32():
            return self._estimate(call, snapshot)

    def _estimate(self, call: ObjectiveCall, snapshot: Snapshot) -> torch.Tensor:
        masks = self.masks()
        coefs: list[tuple[int, int, float]] = []
        if call.kind == "batched":
            loss = self._estimate_batched(call, masks, coefs)
        else:
            loss = self._evaluate(call) if has_running_stats(self.model) else None   # moves BN running stats
            with torch.no_grad(), frozen_buffers(self.model):
                for r in range(self.q):
                    self._perturb(r, self.mu, masks, snapshot)
                    plus = self._evaluate(call)
                    self._perturb(r, -self.mu, masks, snapshot)
                    minus = self._evaluate(call)
                    snapshot.restore_params()
                    coefs.append((self.step_count, r, float((plus - minus) / (2 * self.mu))))
                    if loss is None:
                        loss = (plus + minus) / 2
        self._coefs = coefs
        self.step_count += 1
        return loss

    def _estimate_batched(self, call: ObjectiveCall, masks: dict[str, torch.Tensor],
                          coefs: list[tuple[int, int, float]]) -> torch.Tensor:
        """Rows 2r, 2r+1 of the stacked params are θ₀ + μz_r and θ₀ − μz_r."""
        first: list[torch.Tensor] = []

        def fill(g0: int, g1: int, rows: list[torch.Tensor]) -> None:
            for k, r in enumerate(range(g0, g1)):
                for i, (name, p) in enumerate(self.named_params):
                    z = self._direction(self.step_count, r, i, p, masks.get(name)).reshape(-1)
                    rows[i][2 * k].add_(z, alpha=self.mu)
                    rows[i][2 * k + 1].add_(z, alpha=-self.mu)
                    del z   # one direction tensor alive at a time

        def consume(g0: int, g1: int, losses: torch.Tensor, loss0: torch.Tensor | None) -> None:
            for k, r in enumerate(range(g0, g1)):
                coefs.append((self.step_count, r, float((losses[k, 0] - losses[k, 1]) / (2 * self.mu))))
            if not first:
                first.append((losses[0, 0] + losses[0, 1]) / 2)

        self._batched(call, self.q, 2, fill, consume, base=False)
        return first[0]

    def _backward(self, call: ObjectiveCall, snapshot: Snapshot) -> torch.Tensor:
        loss = self._estimate(call, snapshot)
        masks = self.masks()
        for i, (name, p) in enumerate(self.named_params):
            g = torch.zeros_like(p)
            for step, r, c in self._coefs:
                g.add_(self._direction(step, r, i, p, masks.get(name)), alpha=c / self.q)
            p.grad = torch.sign(g) if self.sign else g
        return loss

    @torch.no_grad()
    def step(self, lr: float, weight_decay: float = 0.0) -> None:
        """In-place ZO-SGD update θ ← θ − lr·(ĝ + wd·θ) from the last ``estimate``, no gradient memory."""
        masks = self.masks()
        for i, (name, p) in enumerate(self.named_params):
            if weight_decay:
                p.mul_(1 - lr * weight_decay)
            for step, r, c in self._coefs:
                p.add_(self._direction(step, r, i, p, masks.get(name)), alpha=-lr * c / self.q)

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "seed": self.seed, "step_count": self.step_count,
                "coefs": [list(t) for t in self._coefs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries, self.seed = int(state["queries"]), int(state["seed"])
        self.step_count = int(state["step_count"])
        self._coefs = [(int(t), int(r), float(c)) for t, r, c in state.get("coefs", [])]
