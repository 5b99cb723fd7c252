"""Perturbed activations in compact form, and how each layer type propagates them.

Evaluating K coordinate perturbations at once, a node's perturbed value is one of

- ``Full(t)``: ``t`` is ``[K, B, *per_sample_shape]``;
- ``Chan(idx, v)``: the cached value ``[B, C, *spatial]`` with channel ``idx[k]`` replaced by
  ``v[k]`` (``v``: ``[K, B, *spatial]``) — what a Conv/BN coordinate produces, and what stays true
  through channel-wise layers (BN, activations, pooling);
- ``Feat(cols, v)``: the cached ``[B, F]`` value with columns ``cols[k]`` (``[K, S]``) replaced by
  ``v[k]`` (``[K, B, S]``) — what a Linear coordinate or a flattened channel produces.

A Conv2d or Linear layer receiving a Chan/Feat input only needs the *change* of that input: its
output is the cached output plus a one-input-channel convolution (or S-column matmul) of the
change — the exactness follows from linearity (zero padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Full:
    t: torch.Tensor  # [K, B, ...]

    @property
    def K(self) -> int:
        return self.t.shape[0]


@dataclass
class Chan:
    idx: torch.Tensor  # [K] channel per perturbation
    v: torch.Tensor    # [K, B, *spatial]

    @property
    def K(self) -> int:
        return self.v.shape[0]


@dataclass
class Feat:
    cols: torch.Tensor  # [K, S] feature columns per perturbation
    v: torch.Tensor     # [K, B, S]

    @property
    def K(self) -> int:
        return self.v.shape[0]


Rep = Full | Chan | Feat


def channel_of(cached: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``cached[:, idx[k]]`` stacked over k: ``[K, B, *spatial]``."""
    return cached.transpose(0, 1).index_select(0, idx)


def columns_of(cached: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``cached[:, cols[k]]`` stacked over k: ``[K, B, S]``."""
    K, S = cols.shape
    return cached.index_select(1, cols.reshape(-1)).reshape(cached.shape[0], K, S).transpose(0, 1)


def materialize(rep: Rep, cached: torch.Tensor) -> torch.Tensor:
    """The full perturbed tensor ``[K, B, ...]``."""
    if isinstance(rep, Full):
        return rep.t
    K = rep.K
    t = cached.unsqueeze(0).repeat(K, *([1] * cached.dim()))  # [K, B, ...]
    ar = torch.arange(K, device=cached.device)
    if isinstance(rep, Chan):
        t.transpose(1, 2)[ar, rep.idx] = rep.v
    else:
        t.transpose(1, 2)[ar.unsqueeze(1), rep.cols] = rep.v.transpose(1, 2)
    return t


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unflat(t: torch.Tensor, K: int) -> torch.Tensor:
    return t.reshape(K, t.shape[0] // K, *t.shape[1:])


# ---------------------------------------------------------------------------------------------
# channel-wise layers
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus,
               nn.Hardtanh, nn.Hardswish, nn.Mish, nn.Identity)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d,
         nn.AdaptiveAvgPool1d)


def maxpool2x2(v: torch.Tensor) -> torch.Tensor:
    """2×2/stride-2 max pooling of ``[..., H, W]`` as two strided maxima (same values as F.max_pool2d)."""
    H, W = v.shape[-2] // 2 * 2, v.shape[-1] // 2 * 2
    v = v[..., :H, :W]
    rows = torch.maximum(v[..., 0::2, :], v[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_plain_2x2(m: nn.Module) -> bool:
    def pair(a):
        return a if isinstance(a, tuple) else (a, a)

    return (isinstance(m, nn.MaxPool2d) and pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


def pool_channel(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """Apply a channel-local pooling module to one channel per perturbation: ``[K, B, *sp]``."""
    if _is_plain_2x2(m):
        return maxpool2x2(v)
    K, B = v.shape[:2]
    out = m(v.reshape(K * B, 1, *v.shape[2:]))
    return out.reshape(K, B, *out.shape[2:])


def bn_uses_batch_stats(m: nn.modules.batchnorm._BatchNorm) -> bool:
    return m.training or m.running_mean is None


def bn_channel(m: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """BatchNorm of one channel per perturbation, ``v``: [K, B, *sp] (channel idx[k])."""
    shape = (v.shape[0],) + (1,) * (v.dim() - 1)
    if bn_uses_batch_stats(m):
        dims = tuple(range(1, v.dim()))
        mean = v.mean(dim=dims, keepdim=True)
        var = v.var(dim=dims, unbiased=False, keepdim=True)
    else:
        mean = m.running_mean[idx].reshape(shape)
        var = m.running_var[idx].reshape(shape)
    out = (v - mean) * torch.rsqrt(var + m.eps)
    if m.affine:
        out = out * m.weight[idx].reshape(shape) + m.bias[idx].reshape(shape)
    return out


def bn_columns(m: nn.modules.batchnorm._BatchNorm, cols: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d on [B, F] restricted to columns ``cols`` [K, S]; ``v``: [K, B, S]."""
    if bn_uses_batch_stats(m):
        mean = v.mean(dim=1, keepdim=True)
        var = v.var(dim=1, unbiased=False, keepdim=True)
    else:
        mean = m.running_mean[cols].unsqueeze(1)
        var = m.running_var[cols].unsqueeze(1)
    out = (v - mean) * torch.rsqrt(var + m.eps)
    if m.affine:
        out = out * m.weight[cols].unsqueeze(1) + m.bias[cols].unsqueeze(1)
    return out


def bn_full(m: nn.modules.batchnorm._BatchNorm, t: torch.Tensor) -> torch.Tensor:
    """BatchNorm with per-perturbation batch statistics, ``t``: [K, B, C, *sp]."""
    C = t.shape[2]
    shape = (1, 1, C) + (1,) * (t.dim() - 3)
    if bn_uses_batch_stats(m):
        dims = (1,) + tuple(range(3, t.dim()))
        mean = t.mean(dim=dims, keepdim=True)
        var = t.var(dim=dims, unbiased=False, keepdim=True)
    else:
        mean, var = m.running_mean.reshape(shape), m.running_var.reshape(shape)
    out = (t - mean) * torch.rsqrt(var + m.eps)
    if m.affine:
        out = out * m.weight.reshape(shape) + m.bias.reshape(shape)
    return out


# ---------------------------------------------------------------------------------------------
# module handlers: (module, rep, cached_in, cached_out) -> rep, or None when not handled
def conv2d_supported(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def propagate_module(m: nn.Module, rep: Rep, cached_in: torch.Tensor, cached_out: torch.Tensor) -> Rep | None:
    if isinstance(m, ELEMENTWISE) or (isinstance(m, nn.Dropout) and not m.training):
        if isinstance(rep, Full):
            return Full(m(rep.t))
        return Chan(rep.idx, m(rep.v)) if isinstance(rep, Chan) else Feat(rep.cols, m(rep.v))
    if isinstance(m, POOLS):
        if isinstance(rep, Chan):
            return Chan(rep.idx, pool_channel(m, rep.v))
        if isinstance(rep, Full):
            return Full(_unflat(m(_flat(rep.t)), rep.K))
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if isinstance(rep, Chan):
            return Chan(rep.idx, bn_channel(m, rep.idx, rep.v))
        if isinstance(rep, Feat) and cached_in.dim() == 2:
            return Feat(rep.cols, bn_columns(m, rep.cols, rep.v))
        if isinstance(rep, Full):
            return Full(bn_full(m, rep.t))
        return None
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            return None
        if isinstance(rep, Chan):
            S = rep.v[0, 0].numel()
            cols = rep.idx.unsqueeze(1) * S + torch.arange(S, device=rep.idx.device)
            return Feat(cols, rep.v.reshape(rep.K, rep.v.shape[1], S))
        if isinstance(rep, Full):
            return Full(rep.t.flatten(2))
        return rep
    if conv2d_supported(m):
        if isinstance(rep, Chan):
            K, B = rep.v.shape[:2]
            delta = (rep.v - channel_of(cached_in, rep.idx)).transpose(0, 1)   # [B, K, H, W]
            w = m.weight.index_select(1, rep.idx).transpose(0, 1)              # [K, Cout, kh, kw]
            w = w.reshape(K * m.out_channels, 1, *m.kernel_size)
            out = F.conv2d(delta, w, None, m.stride, m.padding, m.dilation, groups=K)  # [B, K*Cout, H', W']
            out = out.reshape(B, K, m.out_channels, *out.shape[2:]).transpose(0, 1)
            return Full(out + cached_out.unsqueeze(0))
        if isinstance(rep, Full):
            return Full(_unflat(m(_flat(rep.t)), rep.K))
        return None
    if isinstance(m, nn.Linear):
        if isinstance(rep, Feat) and cached_in.dim() == 2:
            delta = rep.v - columns_of(cached_in, rep.cols)                   # [K, B, S]
            w = m.weight[:, rep.cols].permute(1, 0, 2)                          # [K, Cout, S]
            return Full(cached_out.unsqueeze(0) + torch.bmm(delta, w.transpose(1, 2)))
        if isinstance(rep, Full):
            return Full(m(rep.t))
        return None
    return None


# ---------------------------------------------------------------------------------------------
# perturbation sources: coordinates of a layer's own parameters
def conv_weight_source(m: nn.Conv2d, flat_idx: torch.Tensor, mu: float, patches: torch.Tensor,
                       cached_out: torch.Tensor) -> Chan:
    """W[o, c, i, j] += mu changes output channel o by mu times the (i, j)-shifted input channel c.

    ``patches``: ``F.unfold`` of the cached input, [B, C*kh*kw, L].
    """
    per_out = m.weight[0].numel()
    o = torch.div(flat_idx, per_out, rounding_mode="floor")
    rows = flat_idx - o * per_out                                               # c*kh*kw + i*kw + j
    shifted = patches.index_select(1, rows).transpose(0, 1)                     # [K, B, L]
    shifted = shifted.reshape(len(flat_idx), cached_out.shape[0], *cached_out.shape[2:])
    return Chan(o, channel_of(cached_out, o) + mu * shifted)


def bias_source(flat_idx: torch.Tensor, mu: float, cached_out: torch.Tensor) -> Rep:
    if cached_out.dim() == 2:
        return Feat(flat_idx.unsqueeze(1), columns_of(cached_out, flat_idx.unsqueeze(1)) + mu)
    return Chan(flat_idx, channel_of(cached_out, flat_idx) + mu)


def linear_weight_source(m: nn.Linear, flat_idx: torch.Tensor, mu: float, cached_in: torch.Tensor,
                         cached_out: torch.Tensor) -> Feat:
    """W[i, j] += mu changes output unit i by mu * x_j."""
    i = torch.div(flat_idx, m.in_features, rounding_mode="floor")
    j = flat_idx - i * m.in_features
    cols = i.unsqueeze(1)                                                        # [K, 1]
    v = columns_of(cached_out, cols) + mu * cached_in.index_select(1, j).transpose(0, 1).unsqueeze(2)
    return Feat(cols, v)


def bn_weight_source(flat_idx: torch.Tensor, mu: float, xhat: torch.Tensor, cached_out: torch.Tensor) -> Rep:
    """gamma[c] += mu changes channel c by mu * x̂_c (the normalised input)."""
    if cached_out.dim() == 2:
        cols = flat_idx.unsqueeze(1)
        return Feat(cols, columns_of(cached_out, cols) + mu * columns_of(xhat, cols))
    return Chan(flat_idx, channel_of(cached_out, flat_idx) + mu * channel_of(xhat, flat_idx))


def bn_normalized_input(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    dims = (0,) + tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if bn_uses_batch_stats(m):
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
    else:
        mean, var = m.running_mean.reshape(shape), m.running_var.reshape(shape)
    return (x - mean) * torch.rsqrt(var + m.eps)
