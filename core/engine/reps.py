"""Perturbed activations in compact form: what K coordinate perturbations made of one node's value.

A node whose cached value is ``x`` [B, C, *sp] (``C`` the channel or feature dim) carries one of

- ``Full(t)``: every value may differ; ``t`` is [K, C, B, *sp] — *perturbation-major,
  channel-major*, so per-(k, c) statistics (train-mode BatchNorm) are contiguous row reductions
  and channel-local layers see plain [K·C, B, ...] batches;
- ``Chan(idx, v)``: ``x`` with channel ``idx[k]`` replaced by ``v[k]`` (``v``: [K, B, *sp]) — what
  a Conv/BN coordinate produces, kept by channel-wise layers (BN, activations, pooling);
- ``Feat(cols, v)``: a [B, F] value with columns ``cols[k]`` ([K, S]) replaced by ``v[k]`` ([K, S, B])
  — what a Linear coordinate or a flattened channel produces.

Closed forms read the cached values in the same channel-major layout, ``xc = x.transpose(0, 1)``
([C, B, *sp]).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Full:
    t: torch.Tensor  # [K, C, B, *sp]  (or [K, B] for per-sample scalars)

    @property
    def K(self) -> int:
        return self.t.shape[0]


@dataclass(slots=True)
class Chan:
    idx: torch.Tensor  # [K]
    v: torch.Tensor    # [K, B, *sp]

    @property
    def K(self) -> int:
        return self.v.shape[0]


@dataclass(slots=True)
class Feat:
    cols: torch.Tensor  # [K, S]
    v: torch.Tensor     # [K, S, B]

    @property
    def K(self) -> int:
        return self.v.shape[0]


Rep = Full | Chan | Feat


def tensor_of(rep: Rep) -> torch.Tensor:
    """The tensor a rep holds (to compare storages)."""
    return rep.t if isinstance(rep, Full) else rep.v


def channel_major(x: torch.Tensor) -> torch.Tensor:
    """[B, C, *sp] -> contiguous [C, B, *sp]; per-sample scalars [B] stay as they are."""
    return x.transpose(0, 1).contiguous() if x.dim() >= 2 else x


def batch_major(t: torch.Tensor) -> torch.Tensor:
    """Full layout [K, C, B, *sp] -> [K, B, C, *sp] (a view)."""
    return t.transpose(1, 2) if t.dim() >= 3 else t


def from_batch_major(t: torch.Tensor) -> torch.Tensor:
    """[K, B, C, *sp] -> Full layout [K, C, B, *sp] (contiguous)."""
    return t.transpose(1, 2).contiguous() if t.dim() >= 3 else t


def materialize(rep: Rep, xc: torch.Tensor) -> torch.Tensor:
    """The full perturbed tensor in Full layout, from the cached channel-major ``xc``."""
    if isinstance(rep, Full):
        return rep.t
    K = rep.K
    t = xc.unsqueeze(0).repeat(K, *([1] * xc.dim()))
    ar = torch.arange(K, device=xc.device)
    if isinstance(rep, Chan):
        t[ar, rep.idx] = rep.v
    else:
        t[ar.unsqueeze(1), rep.cols] = rep.v
    return t


def apply(rep: Rep, fn: Callable[[torch.Tensor], torch.Tensor]) -> Rep:
    """An element-wise function on whatever values a rep carries."""
    if isinstance(rep, Full):
        return Full(fn(rep.t))
    return Chan(rep.idx, fn(rep.v)) if isinstance(rep, Chan) else Feat(rep.cols, fn(rep.v))


def combine(rep: Rep, oc: torch.Tensor, fn: Callable, rep_first: bool) -> Rep:
    """``fn(a, b)`` element-wise, one operand perturbed (``rep``), the other unchanged and of the same shape.

    ``oc``: the unchanged operand, channel-major. An element-wise op keeps a Chan a Chan and a
    Feat a Feat (only the changed channel/columns differ from the cached result), so
    ``x − net(x)`` or a gate ``a · b`` costs the size of the change, not of the tensor.
    ``rep_first``: the perturbed value is ``a`` (operand order matters for −, /, pow).
    """
    def f(v, o):
        return fn(v, o) if rep_first else fn(o, v)

    if isinstance(rep, Chan):
        return Chan(rep.idx, f(rep.v, oc.index_select(0, rep.idx)))       # [K, B, *sp]
    if isinstance(rep, Feat):
        return Feat(rep.cols, f(rep.v, oc[rep.cols]))                      # [K, S, B]
    return Full(f(rep.t, oc.unsqueeze(0)))
