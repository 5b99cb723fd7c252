"""Decisions that depend on the input's shape, made on the first step with that shape and kept.

For every owned parameter (:class:`core.engine.sources.SourcePlan`):

- whether its closed form applies to this call (a Linear on [B, ..., F] or a conv on an
  unbatched input has none: the parameter is then perturbed in place, :attr:`Coord.LAYER`);
- whether it is a bias that BatchNorm removes (:attr:`Coord.ABSORBED`): a Conv2d's (or a Linear's
  on [B, F]) output read by nothing but a BatchNorm that normalises with the batch's statistics.
  Adding h to one channel then moves that channel's batch mean by exactly h and leaves its
  variance as it was, so BN's output, and the loss, do not change: the finite difference of every
  such coordinate is exactly 0 (for any μ; in floating point the naive loop gets rounding noise of
  the order of ε·ℓ/μ). The engine writes 0 without evaluating them (not counted as queries);
- the pool chain its source can jump (a conv or BatchNorm that starts a fused block);
- the chunk K of perturbations evaluated together, from the widest activation they make.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from core.engine import kernels
from core.engine.graph import Coord
from core.engine.layers import CHANNEL_LOCAL, bn_uses_batch_stats
from core.engine.sources import SourcePlan

if TYPE_CHECKING:
    from core.engine.fast_cge import FastCGE

# Chunk sizes: a widest batched activation of _CPU_ELEMS elements (4 MB in float32: the batched
# tensors stay in cache), or _GPU_ELEMS on a GPU, which wants large batches; but at least
# _MIN_CHUNK perturbations where that stays within 8× the budget, so the ~50 tensor operations a
# chunk costs are shared (measured on one CPU core: 8–24 per chunk are within a few % of each
# other for the paper's CNN, 4 is 10% slower).
_MIN_CHUNK, _MAX_CHUNK = 8, 4096
_CPU_ELEMS, _GPU_ELEMS = 1 << 20, 1 << 24


class ShapePlanner:
    """Per-shape :class:`SourcePlan` lists for one engine (the latest shape is kept)."""

    def __init__(self, engine: FastCGE) -> None:
        self.engine = engine
        self._key: tuple | None = None
        self._plans: list[SourcePlan] = []

    def plan(self, x: torch.Tensor, env: dict[fx.Node, Any], chunk: int | None) -> list[SourcePlan]:
        key = (tuple(x.shape), x.dtype, x.device, chunk, kernels.enabled(x))
        if key != self._key:
            self._key, self._plans = key, [self._shaped(p, env, chunk) for p in self.engine.params]
        return self._plans

    def units(self, x: torch.Tensor, chunk: int | None, central: bool) -> list[int] | None:
        """Per owned parameter, how many of its coordinates one batch evaluates on input ``x``
        (None: no plan for this shape yet).

        The engine takes a parameter's coordinates in batches of this many, from the first one it
        is given; a caller that splits the coordinates at multiples of it (counted from the
        parameter's first active coordinate) gets the batches of one call, bit for bit
        (:func:`core.sharding.split`). Coordinates perturbed in place or skipped count 1.
        """
        if (tuple(x.shape), x.dtype, x.device, chunk, kernels.enabled(x)) != self._key:
            return None
        return [1 if p.coord in (Coord.LAYER, Coord.MODEL, Coord.ABSORBED)
                else max(1, p.chunk // 2) if central else p.chunk for p in self._plans]

    def _shaped(self, plan: SourcePlan, env: dict[fx.Node, Any], chunk: int | None) -> SourcePlan:
        coord, node = plan.coord, plan.node
        if coord in (Coord.LAYER, Coord.MODEL):
            return plan
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node) or not isinstance(env.get(src), torch.Tensor):
            return replace(plan, coord=Coord.LAYER)
        dims = env[src].dim() - 1
        linear, conv = isinstance(plan.module, nn.Linear), isinstance(plan.module, nn.Conv2d)
        if dims < 1 or (linear and dims != 1) or (conv and dims != 3):
            return replace(plan, coord=Coord.LAYER)      # e.g. Linear on [B, ..., F]: no closed form here
        engine = self.engine
        if coord is Coord.BIAS and (linear or conv) and self._normalised_away(node):
            return replace(plan, coord=Coord.ABSORBED, per_sample_dims=dims)
        chain = None
        if coord in (Coord.CONV_WEIGHT, Coord.BIAS) and node in engine.blocks:
            chain = engine.blocks[node].chain
        elif coord in (Coord.BN_WEIGHT, Coord.BIAS) and node in engine.chains:
            chain = engine.chains[node]
        B = env[src].shape[0]
        budget = engine.max_elems or (_CPU_ELEMS if env[src].device.type == "cpu" else _GPU_ELEMS)
        per = max(1, B * self._width(node, env, self._unmaterialised(env[src])))
        K = chunk or min(_MAX_CHUNK, max(budget // per, min(_MIN_CHUNK, 8 * budget // per), 1))
        return replace(plan, chain=chain, per_sample_dims=dims, chunk=K)

    def _normalised_away(self, node: fx.Node) -> bool:
        """``node``'s only reader is a BatchNorm on it alone that uses the batch's statistics."""
        if len(node.users) != 1:
            return False
        (bn,) = node.users
        m = self.engine._module(bn)                   # PyTorch's own BatchNorm (a subclass may do more)
        return type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and bn_uses_batch_stats(m) and \
            bn.args == (node,) and not bn.kwargs

    def _unmaterialised(self, x: torch.Tensor) -> dict[fx.Node, tuple[fx.Node, ...]]:
        """Block conv -> the nodes of its block whose values the CPU loop never writes out when the
        block's input changed in one channel (:mod:`core.engine.kernels`: only the pool output is, or
        not even that when a global average pool follows; counting it keeps K conservative)."""
        if not kernels.enabled(x):
            return {}
        root = self.engine.root
        return {conv: (conv, b.chain.bn, b.chain.relu) for conv, b in self.engine.blocks.items()
                if root.get_submodule(conv.target).weight[0, 0].numel() == 9}

    def _width(self, node: fx.Node, env: dict[fx.Node, Any],
               fused: dict[fx.Node, tuple[fx.Node, ...]]) -> int:
        """Per-sample elements of the widest *fully perturbed* activation after ``node``.

        Until the first channel-mixing layer a coordinate's change stays in one channel, so those
        nodes count one channel only. If that layer starts a block in ``fused``, the block's inner
        values are never materialised.
        """
        engine = self.engine
        mixed, widest, skip = False, 1, ()
        for n in engine.nodes[engine.order[node]:]:
            v = env.get(n)
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            local = n is node or isinstance(engine._module(n), CHANNEL_LOCAL)
            if not mixed and not local:
                skip = fused.get(n, ())
            mixed = mixed or not local
            if n not in skip:
                size = v[0].numel()
                widest = max(widest, size if mixed else size // max(1, v.shape[1] if v.dim() > 1 else 1))
        return widest
