"""CGE: coordinate-wise gradient estimation (DeepZero, Chen et al., ICLR 2024, Eq. 3).

Forward difference (the paper's default):  ĝ_j = [ℓ(θ + μ e_j) − ℓ(θ)] / μ
Central difference:                        ĝ_j = [ℓ(θ + μ e_j) − ℓ(θ − μ e_j)] / (2μ)

for every active coordinate j (all of them, or those in the sparsity plan's current masks).
Queries per step on a batch of B: (d + 1)·B forward; (2d + 1)·B central (2d perturbed
evaluations plus the unperturbed loss that ``backward`` returns). Deterministic.

For supervised losses on traceable models the estimate comes from the fast exact engine
(:mod:`core.engine`) — layer-level feature reuse, delta forward and batched perturbations — and
equals the naive loop up to float rounding. ``engine="naive"`` forces the reference loop.
General objectives ``objective(model)`` use the naive loop; batched objectives
``objective(model, params)`` receive ``objective_batch`` one-coordinate perturbations per call.
Every path restores θ exactly, also when the step is interrupted by an exception.
With ``shard=`` (:class:`core.distributed.Shard`) each rank of a ``torch.distributed`` group
estimates a share of the coordinates and one all-gather completes the gradient on every rank.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.estimators.base import Snapshot, ZOEstimator, frozen_buffers
from core.estimators.objectives import ObjectiveCall


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
        chunk: the fast engine's perturbations evaluated together (default: chosen from the
            activation sizes).
        objective_batch: parameter sets per call of a batched objective (default 32).
        shard: a :class:`core.distributed.Shard`: this process evaluates only its rank's share of
            the coordinates (None: all of them).

    Example::

        zo = CGE(model, mu=5e-3)
        loss = zo.backward(F.cross_entropy, x, y)   # fills p.grad
        optimizer.step()
    """

    def __init__(self, model: nn.Module, mu: float = 5e-3, *, central: bool = False, sparsity: Any = None,
                 params: Iterable[nn.Parameter] | None = None, sign: bool = False, engine: str = "auto",
                 chunk: int | None = None, objective_batch: int = 32, shard: Any = None) -> None:
        super().__init__(model, params=params, sparsity=sparsity, sign=sign, objective_batch=objective_batch)
        if not mu > 0:
            raise ValueError(f"mu must be > 0; got {mu}")
        if engine not in ("auto", "fast", "naive"):
            raise ValueError(f"engine must be 'auto', 'fast' or 'naive'; got {engine!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None; got {chunk}")
        if shard is not None and not callable(getattr(shard, "backward", None)):
            raise TypeError(f"shard must be a core.distributed.Shard or None; got {type(shard).__name__}")
        self.mu, self.central, self.engine, self.chunk = float(mu), central, engine, chunk
        self.shard = shard
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
        import os
        import sys
        import warnings

        core_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        frame, level = sys._getframe(0), 1
        while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(core_dir):
            frame, level = frame.f_back, level + 1      # up to the first caller outside core: the user's
        warnings.warn(f"{msg}; using the exact naive loop instead (engine='naive' silences this)",
                      RuntimeWarning, stacklevel=level)
        self._fast_failed, self._fast = True, None

    def _backward(self, call: ObjectiveCall, snapshot: Snapshot) -> torch.Tensor:
        del snapshot   # every path restores θ itself; the snapshot serves only on an exception
        active = self.active_indices()
        if self.shard is not None:
            return self.shard.backward(self, call, active)
        loss0, grads = self._estimate(call, active)
        self._set_grads(grads)
        return loss0

    def cut_units(self, call: ObjectiveCall) -> list[int] | None:
        """Per owned parameter, the multiple of coordinates at which a split of its active
        coordinates keeps this call's results bit for bit (None: keep parameters whole).

        The fast engine evaluates a parameter's coordinates in batches fixed by the input's shape
        (known once it ran on that shape); the naive loop one at a time; batched objectives in
        batches that run across parameters (None).
        """
        if call.kind == "batched":
            return None
        if call.kind == "supervised" and self.engine != "naive" and not self._fast_failed:
            fast = self._fast
            return None if fast is None else fast.units(call.x, self.chunk, self.central)
        return [1] * len(self.named_params)

    def _estimate(self, call: ObjectiveCall, active: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(unperturbed loss, flat gradient per owned parameter) over the coordinates ``active``.

        Coordinates outside ``active`` get 0; ``queries`` grows by what was spent. ``p.grad`` is
        left alone (a shard estimates part of the coordinates and gathers the rest first).
        """
        if call.kind == "supervised":
            loss_fn, x, y = call.fn, call.x, call.y
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
                    self.last_engine = "fast"
                    return loss0, grads
        if call.kind == "batched":
            return self._backward_batched(call, active)
        return self._backward_naive(call, active)

    def _backward_naive(self, call: ObjectiveCall, active: list[torch.Tensor]):
        """The reference loop: one full evaluation per coordinate and sign, θ_j restored exactly."""
        self.last_engine = "naive"
        loss0 = self._evaluate(call)
        grads = []
        with torch.no_grad(), frozen_buffers(self.model):
            for (_, p), idx in zip(self.named_params, active):
                g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                flat = p.data.view(-1)
                for j in idx.tolist():
                    old = flat[j].clone()
                    flat[j] = old + self.mu
                    plus = self._evaluate(call)
                    if self.central:
                        flat[j] = old - self.mu
                        minus = self._evaluate(call)
                        g[j] = (plus - minus) / (2 * self.mu)
                    else:
                        g[j] = (plus - loss0) / self.mu
                    flat[j] = old
                grads.append(g)
        return loss0, grads

    def _backward_batched(self, call: ObjectiveCall, active: list[torch.Tensor]):
        """``objective(model, params)`` on ``objective_batch`` parameter sets per call.

        Set k moves one coordinate j by +μ (and, central, the next set by −μ); the unperturbed
        loss is row 0 of the first call. Queries: (d + 1)·Q forward, (2d + 1)·Q central, with Q
        the objective's declared queries per set.
        """
        self.last_engine = "batched"
        jobs = [(i, j) for i, idx in enumerate(active) for j in idx.tolist()]
        grads = [torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for _, p in self.named_params]
        signs = (self.mu, -self.mu) if self.central else (self.mu,)

        def fill(g0: int, g1: int, rows: list[torch.Tensor]) -> None:
            for k, (i, j) in enumerate(jobs[g0:g1]):
                for s, h in enumerate(signs):
                    rows[i][k * len(signs) + s, j] += h

        def consume(g0: int, g1: int, losses: torch.Tensor, loss0: torch.Tensor | None) -> None:
            if self.central:
                g = (losses[:, 0] - losses[:, 1]) / (2 * self.mu)
            else:
                g = (losses[:, 0] - loss0) / self.mu
            for k, (i, j) in enumerate(jobs[g0:g1]):
                grads[i][j] = g[k]

        loss0 = self._batched(call, len(jobs), len(signs), fill, consume, base=True)
        return loss0, grads
