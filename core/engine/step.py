"""What one estimate computes once and every chunk of perturbations reads.

The caching forward gives every node's value ``env[node]`` ([B, C, *sp]); the closed forms read
those values in other layouts, made on first use and kept until the step ends (parameters
change between steps, so nothing here outlives one estimate):

- channel-major ``[C, B, *sp]`` (:meth:`StepCache.cm`), the layout of :mod:`core.engine.reps`;
- window-major rows ``[C, B·H·W]`` (:meth:`StepCache.windowed`) for the fused blocks;
- a conv's im2col ``[C·kh·kw, B·H'·W']`` (:meth:`StepCache.patches`), the coefficient of each
  of its weight coordinates, and a BatchNorm's normalised input x̂ (:meth:`StepCache.xhat`), that
  of each γ coordinate — both in natural or window-major order;
- a conv weight as ``[Cin, Cout, kh·kw]`` (:meth:`StepCache.w_by_input`), so the slice a
  one-channel change needs is one ``index_select``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core.engine import windows as Wn
from core.engine.blocks import monotone
from core.engine.layers import bn_uses_batch_stats
from core.engine.reps import channel_major


class StepCache:
    """Layouts of the cached forward ``env`` for one estimate (see the module docstring)."""

    def __init__(self, env: dict[fx.Node, Any], root: nn.Module) -> None:
        self.env, self.root = env, root
        self._memo: dict[tuple, torch.Tensor | bool | None] = {}

    def _get(self, key: tuple, make) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def cm(self, node: fx.Node) -> torch.Tensor | None:
        """``env[node]`` channel-major [C, B, *sp] (per-sample scalars [B] as they are; None: no tensor)."""
        def make():
            v = self.env.get(node)
            return channel_major(v) if isinstance(v, torch.Tensor) and v.dim() >= 1 else None
        return self._get(("cm", node), make)

    def rows(self, node: fx.Node, windowed: bool) -> torch.Tensor:
        """``env[node]`` [B, C, *sp] as [C, B·|sp|] rows, natural or (4-D only) window-major."""
        def make():
            if not windowed:
                return self.cm(node).flatten(1)
            v = self.env[node]                                                      # one gather
            index = Wn.window_rows_index(*v.shape, v.device)
            return v.reshape(-1).index_select(0, index).view(v.shape[1], -1)
        return self._get(("rows", node, windowed), make)

    def patches(self, node: fx.Node, m: nn.Conv2d, windowed: bool) -> torch.Tensor:
        """im2col of conv ``node``'s cached input: [C·kh·kw, B·H'·W'] (the output's positions).

        One gather from the channel-major input (:func:`core.engine.windows.conv_gather_index`),
        already in window-major order if asked: no unfold, transpose and reorder copies.
        """
        def make():
            x = self.cm(node.args[0])                                             # [C, B, H, W]
            C, B, H, W = x.shape
            index = Wn.conv_gather_index(m, B, H, W, windowed, x.device)
            taps = m.kernel_size[0] * m.kernel_size[1]
            return Wn.im2col_one_channel(x, index, taps).view(C * taps, -1)       # row c·kh·kw + i·kw + j
        return self._get(("patches", node, windowed), make)

    def xhat(self, node: fx.Node, m: nn.modules.batchnorm._BatchNorm, windowed: bool) -> torch.Tensor:
        """x̂ of BatchNorm ``node``'s cached input as [C, B·|sp|] rows (per-sample scalars: [C, B])."""
        def make():
            rows = self.rows(node.args[0], windowed)                  # the statistics ignore the order
            if bn_uses_batch_stats(m):
                c = rows - rows.mean(1, keepdim=True)
                return c.mul_(torch.rsqrt(c.square().mean(1, keepdim=True) + m.eps))
            return (rows - m.running_mean.unsqueeze(1)) * torch.rsqrt(m.running_var.unsqueeze(1) + m.eps)
        return self._get(("xhat", node, windowed), make)

    def w_by_input(self, m: nn.Conv2d) -> torch.Tensor:
        """The conv weight [Cout, Cin, kh, kw] as [Cin, Cout, kh·kw] (contiguous)."""
        return self._get(("w", m), lambda: m.weight.transpose(0, 1).flatten(2).contiguous())

    def scratch(self, node: fx.Node) -> Callable[[tuple[int, ...], torch.Tensor], torch.Tensor]:
        """``buffer(shape, like)``: an output buffer for the fused block ending at ``node``, reused
        by every chunk of this step.

        The fused loops write each chunk's block output into it: fresh memory of a few MB per chunk
        costs a page fault per 4 kB on first touch. A chunk's values are dead once its losses exist,
        and each node is computed once per chunk, so one buffer per node is safe.
        """
        def buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
            n = math.prod(shape)
            buf = self._memo.get(("scratch", node))
            if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
                buf = self._memo[("scratch", node)] = like.new_empty(n)
            return buf[:n].view(shape)
        return buffer

    def monotone(self, bn: nn.Module) -> bool:
        """BN → ReLU commutes with max-pooling this step (see :func:`core.engine.blocks.monotone`)."""
        return self._get(("monotone", bn), lambda: monotone(bn))
