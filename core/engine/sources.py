"""Where one parameter's coordinates enter the graph, and the perturbed value each one makes there.

Perturbing one coordinate by h changes its layer's output in closed form (DeepZero, Chen et al.
2024, suggest it; "delta forward" here):

- Conv2d weight W[o, c, i, j]: output channel o += h · (input channel c shifted by (i, j)), i.e.
  h times row (c, i, j) of the im2col of the cached input;
- Linear weight W[i, j]: output unit i += h · x_j;
- BatchNorm γ[c]: channel c += h · x̂_c (the normalised input); any bias: channel or unit += h.

K coordinates of one parameter travel together; ``h`` is a [K] vector (+μ, or +μ and −μ for
central differences). A source at a conv or BatchNorm that starts a fused block lands directly at
the block's pool (:func:`core.engine.blocks.chan_from_terms`): its rows are built in window-major
order, and BatchNorm → ReLU → 2×2 max run on them at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from core.engine.blocks import chan_from_terms
from core.engine.graph import Coord, PoolChain
from core.engine.reps import Chan, Feat, Rep
from core.engine.step import StepCache


@dataclass
class SourcePlan:
    """How one owned parameter is perturbed, for one input shape (made once, read every step).

    ``chain``: the pool chain the source can jump (its conv or BatchNorm is ``node``); ``chunk``:
    the coordinates evaluated together.
    """
    name: str
    param: nn.Parameter
    coord: Coord
    node: fx.Node | None = None
    module: nn.Module | None = None
    chain: PoolChain | None = None
    per_sample_dims: int = 0
    chunk: int = 1


def _terms(plan: SourcePlan, idx: torch.Tensor, cache: StepCache, windowed: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(channel ``ch`` [K], cached rows Y [C, B·|sp|], coefficient rows, coefficient row of each
    perturbation): channel ``ch[k]`` becomes ``Y[ch[k]] + h[k] · coef[cidx[k]]`` (no coef: ``+ h[k]``)."""
    m, node = plan.module, plan.node
    y = cache.rows(node, windowed)                                              # [C, B·|sp|]
    if plan.coord is Coord.CONV_WEIGHT:
        per_out = m.weight[0].numel()
        ch = torch.div(idx, per_out, rounding_mode="floor")
        return ch, y, cache.patches(node, m, windowed), idx - ch * per_out     # rows c·kh·kw + i·kw + j
    if plan.coord is Coord.BN_WEIGHT:
        return idx, y, cache.xhat(node, m, windowed), idx
    return idx, y, None, None                                                   # Coord.BIAS


def _rows(plan: SourcePlan, idx: torch.Tensor, h: torch.Tensor, cache: StepCache,
          windowed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel of each perturbation [K], its new values [K, B·|sp|]) for conv/BN/bias coordinates."""
    ch, y, coef, cidx = _terms(plan, idx, cache, windowed)
    rows = y.index_select(0, ch)
    if coef is None:
        return ch, rows.add_(h.unsqueeze(1))
    return ch, rows.addcmul_(coef.index_select(0, cidx), h.unsqueeze(1))


def source(plan: SourcePlan, idx: torch.Tensor, h: torch.Tensor, cache: StepCache) -> tuple[fx.Node, Rep]:
    """The rep K coordinates ``idx`` (flat indices into the parameter) make, and the node it describes.

    ``h`` [K]: each coordinate's step. The node is the owning layer, or the pool of its chain
    when the block is fused this step.
    """
    m, node = plan.module, plan.node
    if plan.coord is Coord.LINEAR_WEIGHT:
        i = torch.div(idx, m.in_features, rounding_mode="floor")
        x, y = cache.cm(node.args[0]), cache.cm(node)                            # [F_in, B], [F_out, B]
        v = torch.addcmul(y.index_select(0, i), x.index_select(0, idx - i * m.in_features), h.unsqueeze(1))
        return node, Feat(i.unsqueeze(1), v.unsqueeze(1))                        # v: [K, 1, B]
    chain = plan.chain
    if chain is not None:
        bn = None if chain.bn is node else cache.root.get_submodule(chain.bn.target)
        if bn is None or cache.monotone(bn):
            B, _, H, W = cache.env[node].shape
            terms = _terms(plan, idx, cache, windowed=True)
            return chain.pool, chan_from_terms(bn, *terms, h, (B, H // 2, W // 2), cache.scratch(chain.pool))
    ch, rows = _rows(plan, idx, h, cache, windowed=False)
    if plan.per_sample_dims == 1:
        return node, Feat(ch.unsqueeze(1), rows.unsqueeze(1))
    return node, Chan(ch, rows.view(len(ch), *cache.cm(node).shape[1:]))
