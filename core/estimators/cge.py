"""CGE: coordinate-wise gradient estimation (DeepZero, Chen et al., ICLR 2024, Eq. 3).

Forward difference (the paper's default):  ĝ_j = [ℓ(θ + μ e_j) − ℓ(θ)] / μ
Central difference:                        ĝ_j = [ℓ(θ + μ e_j) − ℓ(θ − μ e_j)] / (2μ)

for every active coordinate j (all of them, or those in the sparsity plan's current masks).
Queries per step on a batch of B: (d + 1)·B forward; (2d + 1)·B central (2d perturbed
evaluations plus the unperturbed loss that ``backward`` returns). Deterministic.

For supervised losses on traceable models the estimate comes from the fast exact engine
(:mod:`core.engine`) — layer-level feature reuse, delta forward and batched perturbations — and
equals the naive loop up to float rounding. ``engine="naive"`` forces the reference loop.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.estimators.base import Objective, ZOEstimator, frozen_buffers


class CGE(ZOEstimator):
    """Coordinate-wise gradient estimator.

    Args:
        model: the model.
        mu: the finite-difference step μ (paper default 5e-3).
        central: use the central difference (twice the queries, O(μ²) bias).
        sparsity: a sparsity plan (see :class:`core.sparsity.SparsityPlan`); None = dense.
        params: the parameters to own (default: all trainable ones).
        sign: ZO-SignSGD: use the sign of the estimate.
        engine: ``"auto"`` (fast engine when the model can be analysed), ``"fast"`` (require it)
            or ``"naive"`` (one full forward per coordinate).
        chunk: perturbations evaluated together (default: chosen from the activation sizes).

    Example::

        zo = CGE(model, mu=5e-3)
        loss = zo.backward(F.cross_entropy, x, y)   # fills p.grad
        optimizer.step()
    """

    def __init__(self, model: nn.Module, mu: float = 5e-3, *, central: bool = False, sparsity: Any = None,
                 params: Iterable[nn.Parameter] | None = None, sign: bool = False, engine: str = "auto",
                 chunk: int | None = None) -> None:
        super().__init__(model, params=params, sparsity=sparsity, sign=sign)
        if not mu > 0:
            raise ValueError(f"mu must be > 0; got {mu}")
        if engine not in ("auto", "fast", "naive"):
            raise ValueError(f"engine must be 'auto', 'fast' or 'naive'; got {engine!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None; got {chunk}")
        self.mu, self.central, self.engine, self.chunk = float(mu), central, engine, chunk
        self._fast = None
        self._fast_failed = False
        self.last_engine = None

    def _engine(self):
        if self.engine == "naive" or self._fast_failed:
            return None
        if self._fast is None:
            from core.engine import EngineUnsupported, FastCGE

            try:
                self._fast = FastCGE(self.model, self.named_params)
            except EngineUnsupported as exc:
                self._unsupported(exc)
                return None
        return self._fast

    def _unsupported(self, exc: Exception) -> None:
        """The engine cannot analyse the model: raise (``engine="fast"``) or fall back once, loudly."""
        msg = f"the fast CGE engine cannot analyse this model: {exc}"
        if self.engine == "fast":
            raise ValueError(msg) from None
        import warnings

        warnings.warn(f"{msg}; using the exact naive loop instead (engine='naive' silences this)",
                      RuntimeWarning, stacklevel=4)
        self._fast_failed, self._fast = True, None

    def backward(self, loss_fn: Objective, x: torch.Tensor | None = None,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        active = self.active_indices()
        if x is not None and getattr(loss_fn, "zo_batched", False) is False:
            engine = self._engine()
            if engine is not None:
                def full_forward():
                    return loss_fn(self.model(x), y)

                from core.engine import EngineUnsupported

                try:
                    with torch.no_grad():
                        loss0, grads, queries = engine.estimate(loss_fn, x, y, self.mu, self.central, active,
                                                                full_forward, self.chunk)
                except EngineUnsupported as exc:   # decided before any perturbation: nothing to undo
                    self._unsupported(exc)
                else:
                    self.queries += queries + int(x.shape[0])
                    self._set_grads(grads)
                    self.last_engine = "fast"
                    return loss0
        if getattr(loss_fn, "zo_batched", False):
            return self._backward_batched(loss_fn, active)
        return self._backward_naive(loss_fn, x, y, active)

    def _backward_naive(self, loss_fn: Objective, x, y, active) -> torch.Tensor:
        """The reference loop: one full evaluation per coordinate and sign."""
        self.last_engine = "naive"
        loss0 = self._evaluate(loss_fn, x, y)
        grads = []
        with torch.no_grad(), frozen_buffers(self.model):
            for (_, p), idx in zip(self.named_params, active):
                g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                flat = p.data.view(-1)
                for j in idx.tolist():
                    old = flat[j].clone()
                    flat[j] = old + self.mu
                    plus = self._evaluate(loss_fn, x, y)
                    if self.central:
                        flat[j] = old - self.mu
                        minus = self._evaluate(loss_fn, x, y)
                        g[j] = (plus - minus) / (2 * self.mu)
                    else:
                        g[j] = (plus - loss0) / self.mu
                    flat[j] = old
                grads.append(g)
        self._set_grads(grads)
        return loss0

    def _backward_batched(self, objective, active) -> torch.Tensor:
        """Objective evaluating K perturbed parameter sets per call: ``objective(model, params)``."""
        self.last_engine = "batched"
        K = self.chunk or 32
        base = {n: p.detach() for n, p in self.named_params}
        with torch.no_grad():
            loss0 = objective(self.model, {n: v.unsqueeze(0) for n, v in base.items()}).reshape(-1)[0]
            self.queries += int(getattr(objective, "zo_queries_per_call", 1))
            jobs = [(i, j) for i, idx in enumerate(active) for j in idx.tolist()]
            grads = [torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for _, p in self.named_params]
            names = [n for n, _ in self.named_params]
            with frozen_buffers(self.model):
                for s in range(0, len(jobs), K):
                    chunk = jobs[s:s + K]
                    vals = []
                    for h in ((self.mu, -self.mu) if self.central else (self.mu,)):
                        params = {n: v.unsqueeze(0).repeat(len(chunk), *([1] * v.dim())) for n, v in base.items()}
                        for k, (i, j) in enumerate(chunk):
                            params[names[i]][k].view(-1)[j] += h
                        vals.append(objective(self.model, params).reshape(-1))
                        self.queries += int(getattr(objective, "zo_queries_per_call", 1)) * len(chunk)
                    g = (vals[0] - vals[1]) / (2 * self.mu) if self.central else (vals[0] - loss0) / self.mu
                    for k, (i, j) in enumerate(chunk):
                        grads[i][j] = g[k]
        self._set_grads(grads)
        return loss0.detach()
