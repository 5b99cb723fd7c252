"""Index maps that make 2×2 max-pooling and one-channel im2col contiguous (shapes only, no values).

**Window-major order** of the B·H·W positions of a [B, H, W] map: the four corners of every
2×2 pooling window first — all top-left corners (b, 2i, 2j) in (b, i, j) order, then all
top-right (b, 2i, 2j+1), bottom-left, bottom-right — then the positions no window covers (the last
row or column of an odd side). A row in this order pools with one ``amax`` over four contiguous
quarters, and the result is already in natural [B, H/2, W/2] order; sums over the whole row (the
BatchNorm statistics) do not care about the order.

**Gather index of a convolution**: for every output position (in natural or window-major order)
and every kernel tap, the input position it reads, or one past the last position where the
padding's zeros are. A one-input-channel change ``delta`` [K, B·H·W] with a zero column appended
becomes its im2col [K, taps, positions] in one ``index_select``.

**Window patches** (:func:`window_patches`): the four corners of 2×2 window (i', j') read, through
a kh×kw kernel with stride s and dilation d, the input rows 2s·i' + (q·s + t·d) − padding for
corner row q ∈ {0, 1} and tap row t; for a 3×3 kernel with stride 1 those are four consecutive
rows, and with the columns a 4×4 patch: 16 inputs serve the window's 4 × 9 (corner, tap) products.
Gathering the distinct patch positions once (16 rows of P = B·H'/2·W'/2 values) instead of the
im2col (9 rows of all B·H'·W' positions) moves 2.25× fewer values.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn


@functools.lru_cache(maxsize=64)
def window_order(B: int, H: int, W: int, device: torch.device) -> torch.Tensor:
    """Window-major order of [B, H, W] positions: ``flat[order]`` (natural flat indices, length B·H·W)."""
    idx = torch.arange(B * H * W, device=device).reshape(B, H, W)
    Hp, Wp = H // 2, W // 2
    corners = [idx[:, di:2 * Hp:2, dj:2 * Wp:2].reshape(-1) for di in (0, 1) for dj in (0, 1)]
    rest = torch.ones(H, W, dtype=torch.bool, device=device)
    rest[:2 * Hp, :2 * Wp] = False
    return torch.cat([*corners, idx[:, rest].reshape(-1)])


@functools.lru_cache(maxsize=64)
def window_rows_index(B: int, C: int, H: int, W: int, device: torch.device) -> torch.Tensor:
    """[C·B·H·W] flat indices into a [B, C, H, W] tensor: its rows [C, B·H·W] in window-major order."""
    order = window_order(B, H, W, device)
    b, s = torch.div(order, H * W, rounding_mode="floor"), order % (H * W)
    index = (b * (C * H * W) + s).unsqueeze(0) + (torch.arange(C, device=device) * (H * W)).unsqueeze(1)
    return index.reshape(-1)


def pool_windows(rows: torch.Tensor, pooled: int) -> torch.Tensor:
    """2×2 max-pool of window-major ``rows`` [..., N]: [..., pooled] (``pooled`` = B·(H//2)·(W//2))."""
    return rows[..., :4 * pooled].unflatten(-1, (4, pooled)).amax(-2)


def conv_out_size(m: nn.Conv2d, H: int, W: int) -> tuple[int, int]:
    (kh, kw), (sh, sw) = m.kernel_size, m.stride
    (ph, pw), (dh, dw) = m.padding, m.dilation
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def conv_gather_index(m: nn.Conv2d, B: int, H: int, W: int, windowed: bool,
                      device: torch.device) -> torch.Tensor:
    """[kh·kw · B·Ho·Wo] input positions read by each (tap, output position); B·H·W = a padding zero.

    Output positions in natural order, or window-major (``windowed``) to pool the result directly.
    """
    return _gather_index(m.kernel_size, m.stride, m.padding, m.dilation, B, H, W, windowed, device)


@functools.lru_cache(maxsize=64)
def _gather_index(kernel, stride, padding, dilation, B, H, W, windowed, device) -> torch.Tensor:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    b = torch.arange(B, device=device).view(B, 1, 1) * (H * W)
    oi = torch.arange(Ho, device=device).view(1, Ho, 1) * sh - ph
    oj = torch.arange(Wo, device=device).view(1, 1, Wo) * sw - pw
    taps = []
    for ti in range(kh):
        for tj in range(kw):
            i, j = oi + ti * dh, oj + tj * dw
            inside = (i >= 0) & (i < H) & (j >= 0) & (j < W)
            src = torch.where(inside, b + i.clamp(0, H - 1) * W + j.clamp(0, W - 1), B * H * W)
            taps.append(src.reshape(-1))                                     # [B·Ho·Wo]
    index = torch.stack(taps)                                                # [taps, B·Ho·Wo]
    if windowed:
        index = index[:, window_order(B, Ho, Wo, device)]
    return index.reshape(-1).to(torch.int32 if B * H * W < 2 ** 31 else torch.int64)   # int32: a faster gather


class WindowPatches(NamedTuple):
    """Where the 2×2 windows of a conv's output read its input (see the module docstring)."""
    rows: torch.Tensor     # [R, P]: input position of patch row r at each window (B·H·W: padding)
    taps: torch.Tensor     # [4, kh·kw] int64: the patch row corner q reads through tap t
    tail: torch.Tensor     # [kh·kw, N − 4P]: the gather index of the output positions no window covers
    square: bool           # 3×3, stride 1, dilation 1: the rows are a 4×4 patch, row (a, b) = 4a + b


def window_patches(m: nn.Conv2d, B: int, H: int, W: int, device: torch.device) -> WindowPatches:
    """The :class:`WindowPatches` of conv ``m`` on [B, 1, H, W] inputs (output in window-major order)."""
    return _window_patches(m.kernel_size, m.stride, m.padding, m.dilation, B, H, W, device)


@functools.lru_cache(maxsize=64)
def _window_patches(kernel, stride, padding, dilation, B, H, W, device) -> WindowPatches:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    Hp, Wp = Ho // 2, Wo // 2
    offs_r = sorted({q * sh + t * dh for q in (0, 1) for t in range(kh)})    # input row - 2·s·i' + padding
    offs_c = sorted({q * sw + t * dw for q in (0, 1) for t in range(kw)})
    b = torch.arange(B, device=device).view(B, 1, 1) * (H * W)
    ii = torch.arange(Hp, device=device).view(1, Hp, 1) * (2 * sh) - ph
    jj = torch.arange(Wp, device=device).view(1, 1, Wp) * (2 * sw) - pw
    rows = []
    for r in offs_r:
        for c in offs_c:
            i, j = ii + r, jj + c
            inside = (i >= 0) & (i < H) & (j >= 0) & (j < W)
            rows.append(torch.where(inside, b + i.clamp(0, H - 1) * W + j.clamp(0, W - 1), B * H * W).reshape(-1))
    taps = torch.tensor([[offs_r.index(qi * sh + ti * dh) * len(offs_c) + offs_c.index(qj * sw + tj * dw)
                          for ti in range(kh) for tj in range(kw)] for qi in (0, 1) for qj in (0, 1)],
                        dtype=torch.int64)
    full = _gather_index(kernel, stride, padding, dilation, B, H, W, True, device).view(kh * kw, -1)
    dtype = full.dtype
    square = (kh, kw, sh, sw, dh, dw) == (3, 3, 1, 1, 1, 1)
    return WindowPatches(torch.stack(rows).to(dtype), taps, full[:, 4 * B * Hp * Wp:].contiguous(), square)


def im2col_one_channel(delta: torch.Tensor, index: torch.Tensor, taps: int) -> torch.Tensor:
    """im2col [K, taps, positions] of one input channel per perturbation (``delta`` [K, B·H·W])."""
    K = delta.shape[0]
    padded = torch.cat([delta.reshape(K, -1), delta.new_zeros(K, 1)], 1)    # [K, B·H·W + 1]
    return padded.index_select(1, index).view(K, taps, -1)
