"""The three kinds of objective an estimator's ``backward`` accepts, and what each evaluation costs.

``backward`` accepts

- a supervised loss: ``backward(loss_fn, x, y)`` with ``loss_fn(model(x), y) -> scalar``; one
  evaluation costs B queries (B = ``x.shape[0]``);
- a general objective: ``backward(objective)`` with ``objective(model) -> scalar`` (e.g. a PDE
  rollout through a black-box solver). One evaluation costs 1 query unless the objective declares
  its cost with :func:`objective` (``@objective(queries=B * m)``);
- a batched objective (declared with :func:`batched_objective`): ``objective(model, params)``
  where ``params`` maps each owned parameter name to K stacked parameter values ``[K, *shape]``
  and the objective returns the K losses ``[K]`` at once (:func:`core.call_stacked` evaluates a
  model under such stacks). One parameter set costs ``queries`` (default 1); estimators send up
  to ``objective_batch`` sets per call.

:func:`bind_objective` validates a ``backward`` call and classifies it (:class:`ObjectiveCall`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LossFn = Callable[..., torch.Tensor]


def _check_queries(queries: int) -> int:
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries (per-sample model evaluations per parameter set) must be an int >= 1; "
                         f"got {queries!r}")
    return queries


class _Declared:
    """A callable objective with its declared cost; calls go straight to ``fn``."""

    def __init__(self, fn: Callable[..., Any], *, queries: int = 1) -> None:
        if not callable(fn):
            raise TypeError(f"an objective must be callable; got {type(fn).__name__}")
        self.fn, self.queries = fn, _check_queries(queries)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        """Decorating a method: bind it like a function would be bound."""
        if obj is None:
            return self
        return type(self)(functools.partial(self.fn, obj), queries=self.queries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.fn, '__qualname__', self.fn)!r}, queries={self.queries})"


class Objective(_Declared):
    """A general objective ``fn(model) -> scalar loss`` that costs ``queries`` per evaluation.

    Made by :func:`objective`.
    """


class BatchedObjective(_Declared):
    """``fn(model, params) -> losses [K]`` evaluating K parameter sets; ``queries`` per set.

    Made by :func:`batched_objective`.
    """


def _declare(cls: type[_Declared], fn: Callable[..., Any] | None, queries: int) -> Any:
    _check_queries(queries)
    if fn is None:
        return lambda f: cls(f, queries=queries)
    return cls(fn, queries=queries)


def objective(fn: Callable[[nn.Module], torch.Tensor] | None = None, *, queries: int = 1) -> Any:
    """Declare a general objective ``fn(model) -> scalar`` and what one evaluation costs.

    Args:
        fn: the objective (bare decorator use) or None (``@objective(queries=...)``).
        queries: per-sample model evaluations one call costs (e.g. ``B * m`` for a rollout of
            m steps of a batch of B). Counted in the estimator's ``queries``.

    Example::

        @objective(queries=B * m)
        def rollout_loss(model):
            return unroll(model, state0, m)
        zo.backward(rollout_loss)
    """
    return _declare(Objective, fn, queries)


def batched_objective(fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None, *,
                      queries: int = 1) -> Any:
    """Declare ``fn(model, params) -> losses [K]`` as able to evaluate K parameter sets at once.

    ``params[name]`` is ``[K, *shape]``: K stacked values of each parameter the estimator owns
    (the others keep their current values). The objective must evaluate the model under those
    values — for instance through :func:`core.call_stacked` / :func:`core.stacked_forward` — and
    return one loss per set. When every loss of a step is bit-identical, one probe set tells an
    objective that ignores ``params`` (a ValueError) from a loss that is flat at this scale (a
    RuntimeWarning; the gradient is then 0).

    Args:
        fn: the objective (bare ``@batched_objective``) or None (``@batched_objective(queries=B)``).
        queries: per-sample model evaluations ONE parameter set costs (B for a batch of B).

    Example: see :func:`core.stacked_forward`, and the README's solver-in-the-loop rollout.
    """
    return _declare(BatchedObjective, fn, queries)


@dataclass(frozen=True)
class ObjectiveCall:
    """A validated ``backward`` call: what to evaluate and what one evaluation costs.

    ``kind`` is ``"supervised"`` (``fn(model(x), y)``), ``"general"`` (``fn(model)``) or
    ``"batched"`` (``fn(model, params) -> [K]``); ``per_eval`` is the queries of one evaluation
    (of one parameter set, for batched objectives).
    """
    kind: str
    fn: LossFn
    x: torch.Tensor | None
    y: Any
    per_eval: int


def bind_objective(loss_fn: LossFn, x: torch.Tensor | None = None, y: Any = None) -> ObjectiveCall:
    """Validate the arguments of ``backward`` and classify the objective."""
    if not callable(loss_fn):
        raise TypeError(f"backward() needs a callable loss function or objective; got "
                        f"{type(loss_fn).__name__}")
    if isinstance(loss_fn, (BatchedObjective, Objective)):
        if x is not None or y is not None:
            what = "batched objective(model, params)" if isinstance(loss_fn, BatchedObjective) else \
                "general objective(model)"
            raise ValueError(f"a {what} evaluates the model itself: pass x and y inside it (a closure), not "
                             "to backward()")
        kind = "batched" if isinstance(loss_fn, BatchedObjective) else "general"
        return ObjectiveCall(kind, loss_fn, None, None, loss_fn.queries)
    if x is None:
        if y is not None:
            raise ValueError("y given without x: call backward(loss_fn, x, y) for a supervised loss, or "
                             "backward(objective) for a general objective(model)")
        return ObjectiveCall("general", loss_fn, None, None, 1)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a batched tensor [B, ...]; got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of shape ' + str(tuple(x.shape))}")
    return ObjectiveCall("supervised", loss_fn, x, y, int(x.shape[0]))
