"""How a CGE step's active coordinates are shared among ranks (:class:`core.distributed.Shard`).

Two ways, both deterministic, so every rank computes the same split without talking:

* whole parameters, largest total cost first, each to the least loaded rank (exact: a parameter's
  coordinates are evaluated in the same batches of perturbations as in one process);
* contiguous runs of equal cost in parameter order, cut inside a parameter only after a multiple of
  its engine batch size (exact too, :meth:`core.CGE.cut_units`) or anywhere (within rounding).

:func:`split` picks whichever of the exact ways leaves the most loaded rank less work. A
coordinate's cost is measured per parameter on the first step (see :mod:`core.distributed`).
"""
from __future__ import annotations

import torch


def split(active: list[torch.Tensor], world: int, costs: list[float] | None = None, *,
          whole: bool = True, units: list[int] | None = None) -> list[list[torch.Tensor]]:
    """Share the active coordinates among ``world`` ranks with equal total cost.

    Args:
        active: flat indices of the active coordinates of each parameter.
        world: the number of shares.
        costs: the cost of one coordinate of each parameter (None: all equal).
        whole: keep each parameter on one rank (largest total cost first, each to the least
            loaded rank); else cut the coordinates, in parameter order, into contiguous runs.
        units: with ``whole``, parameter i may also be cut, but only after a multiple of
            ``units[i]`` of its active coordinates (the engine's batches, :meth:`core.CGE.cut_units`):
            contiguous runs in parameter order cut there, or whole parameters, whichever leaves
            the most loaded rank less work.
    Returns:
        ``shares[r][i]``: the indices of parameter i that rank r evaluates (slices of
        ``active[i]``; together a partition of it). Deterministic: every rank computes the same.
    """
    c = [1.0] * len(active) if costs is None else [float(v) for v in costs]
    n = [int(idx.numel()) for idx in active]
    if not whole:
        return _runs(active, world, n, c, [1] * len(active))
    kept = _whole(active, world, n, c)
    if units is None:
        return kept
    cut = _runs(active, world, n, c, [max(1, int(u)) for u in units])

    def heaviest(shares):
        return max(sum(len(t) * v for t, v in zip(share, c, strict=True)) for share in shares)

    return cut if heaviest(cut) < heaviest(kept) else kept


def _whole(active, world, n, c) -> list[list[torch.Tensor]]:
    """Whole parameters, largest total cost first, each to the least loaded rank."""
    load, owner = [0.0] * world, [0] * len(active)
    for i in sorted(range(len(active)), key=lambda i: (-n[i] * c[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += n[i] * c[i]
    return [[idx if owner[i] == r else idx[:0] for i, idx in enumerate(active)] for r in range(world)]


def _runs(active, world, n, c, step) -> list[list[torch.Tensor]]:
    """Contiguous runs of equal cost in parameter order, cut inside parameter i only after a
    multiple of ``step[i]`` coordinates (each run of ``step[i]`` goes where its middle falls)."""
    total = sum(k * v for k, v in zip(n, c))
    shares: list[list[torch.Tensor]] = [[] for _ in range(world)]
    start = 0.0
    for idx, k, v, u in zip(active, n, c, step, strict=True):
        if total > 0 and k:
            size = torch.full(((k + u - 1) // u,), float(u), dtype=torch.float64)  # runs of u, the last shorter
            size[-1] = k - u * (len(size) - 1)
            centre = start + (size.cumsum(0) - size / 2) * v                         # cumulative cost at each run
            owner = (centre * (world / total)).floor().clamp_(0, world - 1).long()
            counts = torch.zeros(world, dtype=torch.float64).index_add_(0, owner, size).long().tolist()
        else:
            counts = [k] + [0] * (world - 1)
        lo = 0
        for r in range(world):
            shares[r].append(idx[lo:lo + counts[r]])
            lo += counts[r]
        start += k * v
    return shares
