"""Fused passes through ``Conv2d → BatchNorm2d → ReLU → MaxPool2d(2)``, the block of DeepZero's CNNs.

Evaluated layer by layer, a perturbed block writes its conv output, reads it back twice for the
BatchNorm statistics, once more for the strided 2×2 maximum, and the strided reads are slow on
small maps. Here each block is one pass over rows held in *window-major* order
(:mod:`core.engine.windows`):

1. the conv output rows of a one-channel change (:func:`chan_through_block`) or of a coordinate's
   own layer (:func:`chan_from_terms`): on a CPU one compiled loop per row computes the row, its
   Σx and Σx² and its 2×2 maxima while the values are in registers (:mod:`core.engine.kernels`);
   elsewhere a batched matmul writes the rows, ``sum``/``vector_norm`` read them for the BatchNorm
   statistics and one ``amax`` over four contiguous quarters of each row pools them;
2. when every channel changed (:func:`full_through_block`) the convolution itself runs in
   channels-last memory and the statistics and strided maximum read that layout;
3. scale, shift and ReLU run on the pooled quarter only.

Step 3 is exact, not an approximation: with a non-negative scale a (every γ ≥ 0, checked each
step), x ↦ relu(a·x + b) is non-decreasing — also in floating point, where rounding is monotone —
so it commutes with the maximum (``pool(relu(bn(x))) == relu(bn(pool(x)))`` bit for bit once the
statistics come from the unpooled x).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from core.engine import kernels
from core.engine import windows as Wn
from core.engine.layers import bn_scale_shift, maxpool2x2
from core.engine.reps import Chan, Full

_BatchNorm = nn.modules.batchnorm._BatchNorm
Scratch = Callable[[tuple[int, ...], torch.Tensor], torch.Tensor]


def monotone(bn: _BatchNorm) -> bool:
    """BN → ReLU commutes with max-pooling: every scale γ/σ is ≥ 0."""
    return not bn.affine or bool((bn.weight >= 0).all())


def bn_relu_pool_rows(bn: _BatchNorm | None, rows: torch.Tensor, ch: torch.Tensor | None,
                      pooled: int) -> torch.Tensor:
    """relu(bn(·)) of the 2×2 maxima of window-major ``rows`` [..., N] -> [..., pooled].

    ``ch``: the channel of each row of [R, N] rows, or None for [K, C, N] rows holding every
    channel. ``bn`` None: the rows are already normalised (a BatchNorm coordinate's own output).
    """
    top = Wn.pool_windows(rows, pooled)
    if bn is None:
        return top.relu_()
    a, b = bn_scale_shift(bn, rows, ch)
    return torch.addcmul(b.unsqueeze(-1), top, a.unsqueeze(-1)).relu_()


def chan_from_terms(bn: _BatchNorm | None, ch: torch.Tensor, Y: torch.Tensor, coef: torch.Tensor | None,
                    cidx: torch.Tensor | None, h: torch.Tensor, pooled_shape: tuple[int, int, int],
                    scratch: Scratch | None = None) -> Chan:
    """A coordinate source at a block's conv (or BatchNorm) as the Chan it makes at the pool.

    Perturbation k sets channel ``ch[k]`` to ``Y[ch[k]] + h[k] · coef[cidx[k]]`` (``coef`` None:
    ``+ h[k]``, a bias); ``Y`` and ``coef`` are rows in window-major order. ``bn`` None: the rows
    are already normalised (a BatchNorm coordinate's own output). ``scratch(shape, like)``: a
    reusable buffer for the compiled loop's output.
    """
    B, Hp, Wp = pooled_shape
    pooled = B * Hp * Wp
    if kernels.enabled(Y):
        if coef is None:
            coef, cidx = Y.new_ones(1, Y.shape[1]), torch.zeros_like(ch)
        out = kernels.rows_pool(Y, ch, coef, cidx, h, pooled, bn,
                                scratch((len(ch), pooled), Y) if scratch is not None else None)
    else:
        rows = Y.index_select(0, ch)
        rows = rows.add_(h.unsqueeze(1)) if coef is None else \
            rows.addcmul_(coef.index_select(0, cidx), h.unsqueeze(1))
        out = bn_relu_pool_rows(bn, rows, ch, pooled)
    return Chan(ch, out.view(-1, B, Hp, Wp))


def chan_through_block(bn: _BatchNorm, new: torch.Tensor, old: torch.Tensor, ch: torch.Tensor,
                       conv: nn.Conv2d, w_by_input: torch.Tensor, y_windows: torch.Tensor,
                       out_shape: tuple[int, int, int], channels_last: bool = False,
                       scratch: Scratch | None = None, mean: bool = False) -> Full:
    """A block whose conv input changed in one channel per perturbation: ``ch[k]`` is now ``new[k]``.

    Args:
        new: [K, B, H, W], the new value of the conv's input channel ``ch[k]``.
        old: [Cin, B, H, W], the cached input (channel-major).
        conv: the block's convolution (its geometry).
        w_by_input: the conv weight as [Cin, Cout, kh·kw].
        y_windows: the cached conv output, [Cout, B·H'·W'] in window-major order.
        out_shape: (B, H', W') of the conv output.
        channels_last: lay the result out in channels-last memory (the next layer is a
            convolution, :func:`full_through_block`); the compiled loop only.
        scratch: ``scratch(shape, like)`` gives a reusable buffer for the loop's output.
        mean: return the global average pool of the pool's output instead, [K, Cout, B, 1, 1].

    Returns the pool's output [K, Cout, B, H'/2, W'/2]. Cost per perturbation: Cout·kh·kw·B·H'·W'
    multiply-adds (the floor of a one-channel change), in one fused loop for a 9-tap kernel on a CPU
    (:func:`core.engine.kernels.block_pool`), else a batched matmul and three reads of the rows.
    """
    K, B, H, W_ = new.shape
    taps = w_by_input.shape[2]
    _, Ho, Wo = out_shape
    pooled = B * (Ho // 2) * (Wo // 2)
    Wk = w_by_input.index_select(0, ch)                                                  # [K, Cout, taps]
    if taps == 9 and kernels.enabled(new, old, y_windows):
        Cout = Wk.shape[1]
        shape = (K, Cout, B) if mean else (K, pooled, Cout) if channels_last else (K, Cout, pooled)
        out = kernels.block_pool(new, old, ch, Wn.window_patches(conv, B, H, W_, new.device), Wk, y_windows,
                                 pooled, bn, channels_last, scratch(shape, new) if scratch is not None else None,
                                 mean)
        if mean:
            return Full(out.view(K, Cout, B, 1, 1))
        if channels_last:                                                                # [K, pooled, Cout]
            return Full(out.view(K, B, Ho // 2, Wo // 2, -1).permute(0, 4, 1, 2, 3))
        return Full(out.view(K, -1, B, Ho // 2, Wo // 2))
    delta = new - old.index_select(0, ch)                                                # [K, B, H, W]
    U = Wn.im2col_one_channel(delta, Wn.conv_gather_index(conv, B, H, W_, True, new.device), taps)
    rows = torch.bmm(Wk, U).add_(y_windows)              # [K, Cout, N]; faster than baddbmm's broadcast copy
    out = bn_relu_pool_rows(bn, rows, None, pooled).view(K, -1, B, Ho // 2, Wo // 2)
    return Full(out.mean((3, 4), keepdim=True) if mean else out)


def full_through_block(conv: nn.Conv2d, bn: _BatchNorm, t: torch.Tensor,
                       scratch: Scratch | None = None, mean: bool = False) -> Full:
    """A block whose conv input changed everywhere: ``t`` [K, C, B, H, W] -> pool output (Full), or
    with ``mean`` its global average pool [K, Cout, B, 1, 1].

    The convolution runs on channels-last memory (oneDNN's fastest layout here); the statistics
    and the strided maximum read that layout directly, so only the pooled quarter is transposed back.
    """
    K, C, B = t.shape[:3]
    x = t.permute(0, 2, 3, 4, 1).reshape(K * B, *t.shape[3:], C).permute(0, 3, 1, 2)   # NCHW view
    y = conv(x).permute(0, 2, 3, 1)                                                     # [K·B, H', W', Cout]
    Ho, Wo, Cout = y.shape[1:]
    y = y.reshape(K, B, Ho, Wo, Cout)
    if kernels.enabled(y):
        out = scratch((K, B, Ho // 2, Wo // 2, Cout), y) if scratch is not None else None
        out = kernels.channels_last_pool(y, bn, out, mean)
        return Full(out.permute(0, 2, 1).view(K, Cout, B, 1, 1) if mean else out.permute(0, 4, 1, 2, 3))
    a, b = bn_scale_shift(bn, y.reshape(K, -1, Cout), None, dim=1)                     # [K, Cout]
    top = maxpool2x2(y.movedim(4, 2)).flatten(3).transpose(2, 3)                        # [K, B, h·w, Cout]
    out = torch.addcmul(b.reshape(-1, 1, 1, Cout), top, a.reshape(-1, 1, 1, Cout)).relu_()   # a, b: [K or 1, Cout]
    out = out.permute(0, 3, 1, 2).reshape(K, Cout, B, Ho // 2, Wo // 2)
    return Full(out.mean((3, 4), keepdim=True) if mean else out)
