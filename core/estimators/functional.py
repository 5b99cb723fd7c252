"""Evaluate a model under K stacked parameter sets at once: the engine of batched objectives.

``call_stacked(model, params, fn)`` returns ``stack_k fn(model with params[name][k])`` — shape
``[K, ...]`` — with ``torch.func.functional_call`` vectorised over k by ``torch.vmap``. The model
itself is never modified: its parameters are swapped only for the duration of the call, and its
buffers are shared by the K sets without being updated (no BatchNorm running-statistics update;
in train mode BatchNorm still normalises each set by its own batch statistics).

When vmap cannot run the model (data-dependent control flow, ``.item()``, random ops, in-place
writes it does not support) the K sets are evaluated one after the other instead, with the same
results up to float rounding; a ``RuntimeWarning`` says so once per model. A model containing a
:class:`core.BlackBox` is always evaluated set by set, so the black box sees real tensors of B
samples and counts its queries (and enforces its budget) exactly.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from core.blackbox import BlackBox, BudgetExceeded
from core.estimators.base import frozen_buffers

# models on which vmap failed once: evaluated set by set from then on (reason kept for messages)
_NO_VMAP: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class _Bound(nn.Module):
    """``fn(model)`` as a module, so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self.m = model
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.fn(self.m, *inputs)


def _check(model: nn.Module, params: dict[str, torch.Tensor]) -> int:
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {parameter name: [K, *shape] tensor}")
    own = dict(model.named_parameters())
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise ValueError(f"params names no parameter of the model: {unknown[:5]} "
                         f"(valid names: {sorted(own)[:8]}...)")
    sizes = {int(v.shape[0]) if v.dim() else -1 for v in params.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError("every params[name] must be [K, *shape] with the same K; got leading sizes "
                         f"{sorted(sizes)}")
    for name, v in params.items():
        if tuple(v.shape[1:]) != tuple(own[name].shape):
            raise ValueError(f"params[{name!r}] has shape {tuple(v.shape)}; expected "
                             f"[K, *{tuple(own[name].shape)}]")
    return sizes.pop()


def call_stacked(model: nn.Module, params: dict[str, torch.Tensor],
                 fn: Callable[..., torch.Tensor], *, vmap: bool | None = None,
                 inputs: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """``fn(model)`` under each of K parameter sets: ``out[k] = fn(model with params[name][k])``.

    Args:
        model: the model; parameters absent from ``params`` keep their values.
        params: ``{name: [K, *shape]}`` stacked values of some of the model's parameters.
        fn: ``fn(model) -> tensor`` (e.g. a loss, or logits).
        vmap: ``None`` (default) vectorise with ``torch.vmap`` where it works, else loop over the
            K sets; ``True`` require vmap (its error propagates); ``False`` always loop.
        inputs: per-set tensors ``[K, ...]``; set k calls ``fn(model, *(t[k] for t in inputs))``
            (e.g. the K diverging states of K solver rollouts).
    Returns:
        ``[K, *fn's output shape]``.
    """
    K = _check(model, params)
    for t in inputs:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != K:
            raise ValueError(f"every per-set input must be a [K, ...] tensor with K = {K}; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    bound = _Bound(model, fn)
    stacked = {"m." + n: v for n, v in params.items()}
    use_vmap = vmap if vmap is not None else (model not in _NO_VMAP and
                                              not any(isinstance(m, BlackBox) for m in model.modules()))
    if use_vmap:
        try:
            return _vmapped(model, bound, stacked, K, inputs)
        except BudgetExceeded:
            raise
        except RuntimeError as exc:   # vmap cannot run this model: fall back below, or raise if asked
            if vmap:
                raise
            reason = str(exc).splitlines()[0][:200]
            _NO_VMAP[model] = reason
            warnings.warn(f"torch.vmap cannot run {type(model).__name__} ({reason}); evaluating the {K} "
                          "parameter sets one by one (same results, slower)", RuntimeWarning, stacklevel=2)
    with frozen_buffers(model):
        outs = [functional_call(bound, {n: v[k] for n, v in stacked.items()}, tuple(t[k] for t in inputs))
                for k in range(K)]
    return torch.stack([torch.as_tensor(o) for o in outs])


def _vmapped(model: nn.Module, bound: nn.Module, stacked: dict[str, torch.Tensor], K: int,
             inputs: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    # In train mode BatchNorm writes its running statistics in place: give each set a throwaway copy
    # of the buffers ([K, *shape]) so the writes stay inside vmap; otherwise the buffers are shared.
    train_stats = any(m.training and getattr(m, "running_mean", None) is not None for m in model.modules())
    buffers = {"m." + n: b.detach().unsqueeze(0).repeat(K, *([1] * b.dim()))
               for n, b in model.named_buffers()} if train_stats else {}

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *a: torch.Tensor) -> torch.Tensor:
        return functional_call(bound, {**p, **b}, a)

    return torch.vmap(one)(stacked, buffers, *inputs)


def stacked_forward(model: nn.Module, params: dict[str, torch.Tensor], *args: Any, vmap: bool | None = None,
                    per_set: bool = False, **kwargs: Any) -> torch.Tensor:
    """``model(*args, **kwargs)`` under each of K parameter sets -> ``[K, *output shape]``.

    The inputs are shared by the K sets, or, with ``per_set=True``, the positional ``args`` are
    ``[K, ...]`` tensors and set k gets ``args[i][k]``. See :func:`call_stacked`.

    Example::

        @batched_objective(queries=x.shape[0])
        def loss(model, params):
            logits = stacked_forward(model, params, x)                       # [K, B, C]
            return F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1),
                                   reduction="none").mean(1)                 # [K]
    """
    if per_set:
        return call_stacked(model, params, lambda m, *a: m(*a, **kwargs), vmap=vmap, inputs=tuple(args))
    return call_stacked(model, params, lambda m: m(*args, **kwargs), vmap=vmap)
