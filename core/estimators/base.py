"""Shared machinery of the ZO estimators: owned parameters, query counting, exception safety.

An estimator binds to a model the way ``torch.optim`` binds to parameters. Its ``backward`` takes a
supervised loss ``(loss_fn, x, y)``, a general objective or a batched objective (the three kinds and
their query costs: :mod:`core.estimators.objectives`), fills ``p.grad`` for every owned parameter
and returns the unperturbed loss (a detached 0-dim tensor). Parameters it does not own keep their
``.grad`` untouched (``None`` if never set); coordinates outside the active sparsity mask get a
gradient of exactly 0.

Exception safety: ``backward`` runs the estimator's work inside :func:`restore_on_error`, so an
exception in the middle of a step (a :class:`core.BudgetExceeded`, a solver error, Ctrl-C) leaves
every owned parameter and every buffer of the model bit-identical to before the step. Cost: one
copy of the owned parameters and of the buffers per step.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from core.estimators.objectives import LossFn, ObjectiveCall, bind_objective
from core.estimators.precision import ieee_float32


# -- buffers and exception safety ------------------------------------------------------------------
@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BN running stats, counters) after perturbed evaluations.

    Perturbed forwards must not move running statistics: only the unperturbed forward of a step
    updates them, exactly as one ordinary training forward would.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class Snapshot:
    """Copies of some parameters and of all buffers of a model, restorable bit-exactly."""

    def __init__(self, model: nn.Module, params: Iterable[torch.Tensor]) -> None:
        with torch.no_grad():
            self.params = [(p, p.detach().clone()) for p in params]
            self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def saved(self, i: int) -> torch.Tensor:
        """The saved value of the i-th parameter."""
        return self.params[i][1]

    def restore_params(self) -> None:
        with torch.no_grad():
            for p, v in self.params:
                p.copy_(v)

    def restore(self) -> None:
        self.restore_params()
        with torch.no_grad():
            for b, v in self.buffers:
                b.copy_(v)


@contextmanager
def restore_on_error(model: nn.Module, params: Iterable[torch.Tensor]) -> Iterator[Snapshot]:
    """Snapshot ``params`` and all buffers of ``model``; on any exception restore them and re-raise.

    Covers every ``BaseException`` (a :class:`core.BudgetExceeded` from a black box, a solver error,
    ``KeyboardInterrupt``), so an interrupted step never leaves a parameter perturbed or a running
    statistic moved. The restore is bit-exact (a copy, not an inverse update). Query counters are
    not rolled back: the queries were spent. Memory: one copy of ``params`` and of the buffers.

    Yields:
        the :class:`Snapshot`, whose saved parameter values the step may reuse (MeZO restores
        from them).
    """
    snap = Snapshot(model, params)
    try:
        yield snap
    except BaseException:
        snap.restore()
        raise


def has_running_stats(model: nn.Module) -> bool:
    """True if some module in train mode keeps running statistics (BatchNorm & co.)."""
    return any(m.training and getattr(m, "running_mean", None) is not None for m in model.modules())


# -- the estimator base class ----------------------------------------------------------------------
class ZOEstimator:
    """Base class: owned parameters, the sparsity plan, objectives, query counting and safety.

    ``backward`` is a template: it validates the arguments (:func:`bind_objective`) and runs the
    subclass's ``_backward(call, snapshot)`` inside :func:`restore_on_error`, with float32 math in
    full precision (:func:`core.estimators.precision.ieee_float32`: no TF32).

    Args:
        model: the model whose parameters are estimated.
        params: the parameters this estimator owns (default: every parameter with ``requires_grad``).
        sparsity: optional object with ``masks() -> dict[str, BoolTensor]`` (e.g.
            :class:`core.sparsity.SparsityPlan`); parameters absent from the dict are dense.
        sign: replace the estimate by its sign (ZO-SignSGD, Liu et al. 2019).
        objective_batch: parameter sets sent in one call of a batched objective (memory: that many
            copies of the owned parameters per call).
    """

    def __init__(self, model: nn.Module, *, params: Iterable[nn.Parameter] | None = None,
                 sparsity: Any = None, sign: bool = False, objective_batch: int = 32) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if params is not None:
            wanted = {id(p) for p in params}
            named = [(n, p) for n, p in named if id(p) in wanted]
        if not named:
            raise ValueError("the estimator owns no trainable parameters (all frozen, or params= matched "
                             "none)")
        if isinstance(objective_batch, bool) or not isinstance(objective_batch, int) or objective_batch < 1:
            raise ValueError(f"objective_batch must be an int >= 1; got {objective_batch!r}")
        self.named_params: list[tuple[str, nn.Parameter]] = named
        self.sparsity = sparsity
        self.sign = sign
        self.objective_batch = objective_batch
        self.queries = 0
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model   # how a supervised loss runs the model

    # -- the template ------------------------------------------------------------------------------
    def backward(self, loss_fn: LossFn, x: torch.Tensor | None = None, y: Any = None) -> torch.Tensor:
        """Fill ``p.grad`` of every owned parameter with the ZO estimate; return the unperturbed loss.

        Args:
            loss_fn: ``loss_fn(output, y)`` with ``x`` and ``y``; or a general ``objective(model)``;
                or a :func:`~core.estimators.objectives.batched_objective`.
            x: the input batch ``[B, ...]`` (supervised losses only).
            y: the targets (supervised losses only).
        Returns:
            the loss at the unperturbed parameters, a detached 0-dim tensor.
        Raises:
            ValueError / TypeError: bad arguments, checked before any evaluation. Any exception in
            the middle of the step propagates after parameters and buffers are restored.
        """
        call = bind_objective(loss_fn, x, y)
        with restore_on_error(self.model, self.params()) as snapshot, ieee_float32():
            return self._backward(call, snapshot)

    def _backward(self, call: ObjectiveCall, snapshot: Snapshot) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers shared by subclasses ----------------------------------------------------------------
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_params]

    def masks(self) -> dict[str, torch.Tensor]:
        if self.sparsity is None:
            return {}
        return self.sparsity.masks()

    def active_indices(self) -> list[torch.Tensor]:
        """Flat indices of the active coordinates of each owned parameter."""
        masks = self.masks()
        out = []
        for name, p in self.named_params:
            m = masks.get(name)
            out.append(torch.arange(p.numel(), device=p.device) if m is None
                       else m.reshape(-1).nonzero().squeeze(1).to(p.device))
        return out

    def num_active(self) -> int:
        return sum(int(i.numel()) for i in self.active_indices())

    def _set_grads(self, grads: list[torch.Tensor]) -> None:
        for (_, p), g in zip(self.named_params, grads):
            g = g.reshape(p.shape).to(p.dtype)
            if self.sign:
                g = torch.sign(g)
            p.grad = g

    def _evaluate(self, call: ObjectiveCall) -> torch.Tensor:
        """One evaluation of the loss at the current parameters (counts ``call.per_eval`` queries)."""
        if call.kind == "batched":
            return self._evaluate_sets(call, {n: p.detach().unsqueeze(0) for n, p in self.named_params})[0]
        with torch.no_grad():
            loss = call.fn(self.forward(call.x), call.y) if call.kind == "supervised" else call.fn(self.model)
        self.queries += call.per_eval
        loss = torch.as_tensor(loss)
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar (e.g. the mean over the batch); got shape "
                             f"{tuple(loss.shape)}")
        return loss.detach().reshape(())

    def _evaluate_sets(self, call: ObjectiveCall, sets: dict[str, torch.Tensor]) -> torch.Tensor:
        """A batched objective on K stacked parameter sets -> losses [K] (counts K·per_eval queries)."""
        K = next(iter(sets.values())).shape[0]
        with torch.no_grad():
            losses = torch.as_tensor(call.fn(self.model, sets))
        self.queries += K * call.per_eval
        if losses.numel() != K:
            raise ValueError(f"the batched objective got {K} parameter sets and must return {K} losses; got "
                             f"shape {tuple(losses.shape)}")
        return losses.detach().reshape(K)

    def _batched(self, call: ObjectiveCall, groups: int, group_size: int,
                 fill: Callable[[int, int, list[torch.Tensor]], None],
                 consume: Callable[[int, int, torch.Tensor, torch.Tensor | None], None], *,
                 base: bool) -> torch.Tensor | None:
        """Evaluate ``groups`` groups of ``group_size`` perturbed parameter sets by a batched objective.

        Whole groups go together, as many per call as ``objective_batch`` allows (at least one).
        With ``base`` the unperturbed parameters are row 0 of the first call (no call of its own
        unless ``objective_batch`` leaves no room beside it). Buffers are restored afterwards, so
        no parameter set (θ included) moves running statistics.

        Args:
            fill: ``fill(g0, g1, rows)`` writes the perturbed values of groups ``g0 .. g1-1`` into
                ``rows`` (per owned parameter a ``[(g1-g0)·group_size, numel]`` tensor holding θ).
            consume: ``consume(g0, g1, losses [(g1-g0), group_size], loss0)``.
        Returns:
            the unperturbed loss (``base``) or None.
        Raises:
            ValueError: every loss of the step is bit-identical although the sets differ, and the
                objective is found to read the model's own parameters instead of ``params``.
        """
        with frozen_buffers(self.model):
            loss0, first_value, all_equal = self._batched_loop(call, groups, group_size, fill, consume, base)
        if all_equal and groups > 0 and first_value is not None and self.num_active() > 0:
            self._check_reads_params(call, first_value)
        return loss0

    def _batched_loop(self, call, groups, group_size, fill, consume, base):
        theta = [p.detach().reshape(1, -1) for _, p in self.named_params]
        K = self.objective_batch
        loss0: torch.Tensor | None = None
        first_value: torch.Tensor | None = None
        all_equal = True
        g0, pending_base = 0, base
        while g0 < groups or pending_base:
            b = 1 if pending_base else 0
            n = min(groups - g0, (K - b) // group_size)
            if n == 0 and not b:
                n = 1   # objective_batch < group_size: one group anyway
            rows = [t.repeat(b + n * group_size, 1) for t in theta]                 # [b + n·gs, numel]
            if n:
                fill(g0, g0 + n, [r[b:] for r in rows])
            losses = self._evaluate_sets(call, {name: r.reshape(-1, *p.shape)
                                                for (name, p), r in zip(self.named_params, rows)})
            del rows
            if b:
                loss0, losses, pending_base = losses[0], losses[1:], False
            if first_value is None:
                first_value = loss0 if loss0 is not None else losses[0]
            all_equal = all_equal and bool((losses == first_value).all())
            if n:
                consume(g0, g0 + n, losses.reshape(n, group_size), loss0)
            g0 += n
        return loss0, first_value, all_equal

    def _check_reads_params(self, call: ObjectiveCall, value: torch.Tensor) -> None:
        """Every loss of a batched step equals ``value``: does the objective ignore ``params``?

        Probe (one more parameter set of queries): move the model's own active coordinates by +μ
        in place and pass the unperturbed values in ``params``. An objective that evaluates
        ``params`` returns ``value`` again; one that reads the model's own parameters sees the move.
        """
        mu = float(getattr(self, "mu", 1e-3))
        with torch.no_grad():
            base = {n: p.detach().clone().unsqueeze(0) for n, p in self.named_params}
            try:
                for (_, p), idx in zip(self.named_params, self.active_indices()):
                    p.view(-1)[idx] += mu
                with frozen_buffers(self.model):
                    probe = self._evaluate_sets(call, base)[0]
            finally:
                for n, p in self.named_params:
                    p.copy_(base[n][0])
        if not torch.equal(probe, value):
            raise ValueError(
                "the batched objective returned the same loss for every perturbed parameter set because it "
                "evaluates the model's own parameters, not the stacked values it is given: it must evaluate "
                "`params` (e.g. `core.stacked_forward(model, params, x)` or "
                "`core.call_stacked(model, params, fn)`), returning one loss per set")
        warnings.warn(f"every perturbed loss of this step equals the unperturbed loss bit for bit "
                      f"({float(value):.6g}): the objective is flat at this scale, so the ZO gradient is 0. "
                      "Increase mu or use a loss that is not piecewise constant", RuntimeWarning,
                      stacklevel=4)

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries = int(state["queries"])
