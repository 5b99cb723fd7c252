"""How one layer passes K perturbations on: closed forms for the layer types DeepZero's models use.

:func:`propagate_module` takes the rep of a layer's input (:mod:`core.engine.reps`) and returns the
rep of its output, or None where it has no closed form (the caller then evaluates the layer once
per perturbation). Channel-wise layers (activations, BatchNorm, pooling) keep a Chan a Chan. A
Conv2d receiving a Chan needs only the *change* of its one input channel: by linearity (zero
padding) its output is the cached output plus a one-input-channel convolution — an im2col of the
change times the weight slice W[:, c], one batched matmul. A Linear receiving a Feat likewise adds
an S-column matmul to its cached output.

Train-mode BatchNorm normalises every perturbed row with that row's own batch statistics, exactly
as a separate forward of that perturbed model would (see :func:`bn_scale_shift`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.engine import windows as Wn
from core.engine.graph import conv2d_supported, is_plain_2x2
from core.engine.reps import Chan, Feat, Full, Rep, apply

ELEMENTWISE = (nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus,
               nn.Hardtanh, nn.Hardswish, nn.Mish)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# layers after which a coordinate's change still sits in one channel (see FastCGE's chunk sizes)
CHANNEL_LOCAL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, *POOLS, nn.Identity, nn.Flatten, *ELEMENTWISE)
_BatchNorm = nn.modules.batchnorm._BatchNorm


def maxpool2x2(v: torch.Tensor) -> torch.Tensor:
    """2×2/stride-2 max pooling of ``[..., H, W]`` as two strided maxima (same values as F.max_pool2d)."""
    H, W = v.shape[-2] // 2 * 2, v.shape[-1] // 2 * 2
    v = v[..., :H, :W]
    rows = torch.maximum(v[..., 0::2, :], v[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def pool(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """A channel-local 2-D pooling module on [N, *, H, W] (any number of leading dims)."""
    if is_plain_2x2(m):
        return maxpool2x2(v)
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):    # global average pool:
        n = v.shape[-2] * v.shape[-1]                                            # a matrix-vector product
        return (v.reshape(-1, n) @ v.new_ones(n)).div_(n).view(*v.shape[:-2], 1, 1)   # sums 9 faster
    lead = v.shape[:-2]
    out = m(v.reshape(-1, 1, *v.shape[-2:]))
    return out.reshape(*lead, *out.shape[-2:])


def bn_uses_batch_stats(m: _BatchNorm) -> bool:
    return m.training or m.running_mean is None


def bn_scale_shift(m: _BatchNorm, rows: torch.Tensor, ch: torch.Tensor | None,
                   dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale ``a`` and shift ``b`` with BN(row) = row·a + b.

    ``rows`` [R, N] with row r holding all N = B·|sp| values of channel ``ch[r]``, or
    [K, C, N] with every channel in order (``ch`` None); ``dim``: the dim of the N values
    (``dim=1``: [K, N, C], channels last). Train mode uses each row's own (biased) batch
    statistics, from Σx and Σx² in two reads of the rows.
    """
    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, ch) if ch is not None else t

    if bn_uses_batch_stats(m):
        n = rows.shape[dim]
        mean = rows.sum(dim).div_(n)
        if dim == -1:                                  # vector_norm is fast along the contiguous dim only
            sq = torch.linalg.vector_norm(rows, dim=-1).square_()
        else:
            sq = rows.square().sum(dim)
        var = sq.div_(n).sub_(mean.square()).clamp_min_(0.0)
    else:
        mean, var = per_row(m.running_mean), per_row(m.running_var).clone()
    a = var.add_(m.eps).rsqrt_()                                               # var is a fresh tensor
    if not m.affine:
        return a, mean.mul(a).neg_()
    a = a.mul_(per_row(m.weight))
    return a, torch.addcmul(per_row(m.bias), mean, a, value=-1)


def bn_rows(m: _BatchNorm, rows: torch.Tensor, ch: torch.Tensor | None) -> torch.Tensor:
    """BatchNorm of ``rows`` (see :func:`bn_scale_shift`)."""
    a, b = bn_scale_shift(m, rows, ch)
    return torch.addcmul(b.unsqueeze(-1), rows, a.unsqueeze(-1))


def bn_relu_maxpool2x2(m: _BatchNorm, rep: Rep) -> Rep | None:
    """BN → ReLU → 2×2 max-pool in one go: pool first, then normalise the 4× smaller result.

    Exact when every scale γ/σ is ≥ 0 (the caller checks; see :mod:`core.engine.blocks`): then
    x ↦ relu(x·a + b) is non-decreasing and commutes with the maximum. The statistics still come
    from the unpooled values. None for a rep of another shape.
    """
    if isinstance(rep, Chan) and rep.v.dim() == 4:
        rows, ch = rep.v.reshape(rep.K, -1), rep.idx
    elif isinstance(rep, Full) and rep.t.dim() == 5:
        rows, ch = rep.t.flatten(2), None                                      # [K, C, N]
    else:
        return None
    a, b = bn_scale_shift(m, rows, ch)
    pooled = maxpool2x2(rep.v if isinstance(rep, Chan) else rep.t)
    out = torch.addcmul(b.unsqueeze(-1), pooled.flatten(rows.dim() - 1), a.unsqueeze(-1)).relu_()
    return Chan(rep.idx, out.view(pooled.shape)) if isinstance(rep, Chan) else Full(out.view(pooled.shape))


def conv_one_channel(m: nn.Conv2d, delta: torch.Tensor, idx: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
    """Perturbed output [K, Cout, B, H', W'] when input channel idx[k] changes by delta[k] ([K, B, H, W]).

    ``yc``: the cached output, channel-major. im2col of the one changed channel ([K, kh·kw, B·L])
    times the weight slice W[:, idx[k]], added to ``yc`` in the same batched matmul.
    """
    K, B, H, W = delta.shape
    taps = m.kernel_size[0] * m.kernel_size[1]
    U = Wn.im2col_one_channel(delta, Wn.conv_gather_index(m, B, H, W, False, delta.device), taps)
    w = m.weight.index_select(1, idx).transpose(0, 1).reshape(K, m.out_channels, taps)
    return torch.baddbmm(yc.reshape(1, m.out_channels, -1), w, U).view(K, *yc.shape)


def conv_full(m: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """The layer on every perturbed input [K, C, B, H, W]; channels-last memory (oneDNN's fast layout)."""
    K, C, B = t.shape[:3]
    x = t.permute(0, 2, 3, 4, 1).reshape(K * B, *t.shape[3:], C).permute(0, 3, 1, 2)   # NCHW, channels-last
    out = m(x)                                                                          # [K·B, Cout, H', W']
    return out.reshape(K, B, *out.shape[1:]).transpose(1, 2).contiguous()


Rule = Callable[[nn.Module, Rep, torch.Tensor, torch.Tensor, int, bool], "Rep | None"]


def rule_for(m: nn.Module) -> Rule | None:
    """The closed form for layer ``m`` (chosen once, when the engine plans), or None."""
    if isinstance(m, nn.ReLU):
        return _relu
    if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training):
        return _identity
    if isinstance(m, ELEMENTWISE):
        return _elementwise
    if isinstance(m, POOLS):
        return _pool
    if isinstance(m, _BatchNorm):
        return _batchnorm
    if isinstance(m, nn.Flatten):
        return _flatten
    if conv2d_supported(m):
        return _conv
    if isinstance(m, nn.Linear):
        return _linear
    return None


def propagate_module(m: nn.Module, rep: Rep, xc: torch.Tensor, yc: torch.Tensor, per_sample_dims: int,
                     inplace: bool = False) -> Rep | None:
    """The perturbed output of module ``m`` (None: no closed form here; the caller falls back).

    ``xc``/``yc``: cached input/output, channel-major; ``per_sample_dims``: dims of one sample's input;
    ``inplace``: ``rep``'s tensors are read by nothing else and may be overwritten. An activation
    built with ``inplace=True`` otherwise works on a copy.
    """
    rule = rule_for(m)
    return rule(m, rep, xc, yc, per_sample_dims, inplace) if rule is not None else None


def _relu(m, rep, xc, yc, dims, inplace):
    return apply(rep, lambda a: F.relu(a, inplace=inplace))


def _identity(m, rep, xc, yc, dims, inplace):
    return rep


def _elementwise(m, rep, xc, yc, dims, inplace):
    if getattr(m, "inplace", False) and not inplace:
        return apply(rep, lambda a: m(a.clone()))
    return apply(rep, m)


def _pool(m, rep, xc, yc, dims, inplace):
    if dims != 3 or isinstance(rep, Feat):
        return None
    return Chan(rep.idx, pool(m, rep.v)) if isinstance(rep, Chan) else Full(pool(m, rep.t))


def _conv(m, rep, xc, yc, dims, inplace):
    if isinstance(rep, Chan):
        delta = rep.v - xc.index_select(0, rep.idx)                              # [K, B, H, W]
        return Full(conv_one_channel(m, delta, rep.idx, yc))
    return Full(conv_full(m, rep.t)) if isinstance(rep, Full) else None


def _batchnorm(m: _BatchNorm, rep: Rep, xc, yc, per_sample_dims: int, inplace) -> Rep | None:
    if isinstance(rep, Chan):
        return Chan(rep.idx, bn_rows(m, rep.v.reshape(rep.K, -1), rep.idx).view(rep.v.shape))
    if isinstance(rep, Feat):
        return Feat(rep.cols, bn_rows(m, rep.v.reshape(-1, rep.v.shape[2]), rep.cols.reshape(-1))
                    .view(rep.v.shape))
    if per_sample_dims >= 1:
        K, C = rep.t.shape[:2]
        return Full(bn_rows(m, rep.t.reshape(K, C, -1), None).view(rep.t.shape))
    return None


def _flatten(m: nn.Flatten, rep: Rep, xc, yc, dims, inplace) -> Rep | None:
    if m.start_dim != 1 or m.end_dim != -1:
        return None
    if isinstance(rep, Chan):
        K, B = rep.v.shape[:2]
        S = rep.v[0, 0].numel()
        cols = rep.idx.unsqueeze(1) * S + torch.arange(S, device=rep.idx.device)
        v = rep.v.reshape(K, B, S)
        return Feat(cols, v.transpose(1, 2).contiguous() if S > 1 else v.reshape(K, 1, B))
    if isinstance(rep, Full):
        K = rep.t.shape[0]
        B = rep.t.shape[2] if rep.t.dim() >= 3 else None
        return Full(rep.t.movedim(2, -1).reshape(K, -1, B)) if B is not None else rep
    return rep


def _linear(m: nn.Linear, rep: Rep, xc: torch.Tensor, yc: torch.Tensor, per_sample_dims: int, inplace) -> Rep | None:
    if isinstance(rep, Feat) and per_sample_dims == 1:
        delta = rep.v - xc[rep.cols]                                             # [K, S, B]
        w = m.weight[:, rep.cols].transpose(0, 1)                                # [K, O, S]
        return Full(torch.baddbmm(yc.unsqueeze(0), w, delta))
    if isinstance(rep, Full):
        if per_sample_dims == 1:                                                 # t: [K, F, B]
            K, F_in, B = rep.t.shape
            x = rep.t.transpose(0, 1).reshape(F_in, K * B)                      # one matmul for all K
            out = m.weight @ x if m.bias is None else torch.addmm(m.bias.unsqueeze(1), m.weight, x)
            return Full(out.view(-1, K, B).transpose(0, 1))                      # [K, O, B] (a view)
        return Full(m(rep.t))                                                    # feature dim is last
    return None
