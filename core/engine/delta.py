"""Perturbed activations in compact form, and how each layer type propagates them.

Evaluating K coordinate perturbations at once, a node whose cached value is ``x`` [B, C, *sp]
(``C`` the channel or feature dim) carries one of

- ``Full(t)``: every value may differ; ``t`` is [K, C, B, *sp] — *perturbation-major,
  channel-major*, so per-(k, c) statistics (train-mode BatchNorm) are contiguous row reductions
  and channel-local layers see plain [K·C, B, ...] batches;
- ``Chan(idx, v)``: ``x`` with channel ``idx[k]`` replaced by ``v[k]`` (``v``: [K, B, *sp]) — what
  a Conv/BN coordinate produces, preserved by channel-wise layers (BN, activations, pooling);
- ``Feat(cols, v)``: a [B, F] value with columns ``cols[k]`` ([K, S]) replaced by ``v[k]`` ([K, S, B])
  — what a Linear coordinate or a flattened channel produces.

Handlers receive the cached tensors in channel-major form ``xc = x.transpose(0, 1)`` ([C, B, *sp]).
A Conv2d/Linear layer receiving a Chan/Feat input only needs the *change* of that input: by
linearity (zero padding) its output is the cached output plus a one-input-channel convolution
(an im2col of the change times the matching weight slice, one batched matmul) or an S-column matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Full:
    t: torch.Tensor  # [K, C, B, *sp]  (or [K, B] for per-sample scalars)

    @property
    def K(self) -> int:
        return self.t.shape[0]


@dataclass
class Chan:
    idx: torch.Tensor  # [K]
    v: torch.Tensor    # [K, B, *sp]

    @property
    def K(self) -> int:
        return self.v.shape[0]


@dataclass
class Feat:
    cols: torch.Tensor  # [K, S]
    v: torch.Tensor     # [K, S, B]

    @property
    def K(self) -> int:
        return self.v.shape[0]


Rep = Full | Chan | Feat


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


def apply(rep: Rep, fn) -> Rep:
    """An element-wise function on whatever values a rep carries."""
    if isinstance(rep, Full):
        return Full(fn(rep.t))
    return Chan(rep.idx, fn(rep.v)) if isinstance(rep, Chan) else Feat(rep.cols, fn(rep.v))


def combine(rep: Rep, oc: torch.Tensor, fn, rep_first: bool) -> Rep:
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


# ---------------------------------------------------------------------------------------------
# channel-wise layers
ELEMENTWISE = (nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus,
               nn.Hardtanh, nn.Hardswish, nn.Mish)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _pair(a):
    return tuple(a) if isinstance(a, (tuple, list)) else (a, a)


def maxpool2x2(v: torch.Tensor) -> torch.Tensor:
    """2×2/stride-2 max pooling of ``[..., H, W]`` as two strided maxima (same values as F.max_pool2d)."""
    H, W = v.shape[-2] // 2 * 2, v.shape[-1] // 2 * 2
    v = v[..., :H, :W]
    rows = torch.maximum(v[..., 0::2, :], v[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_plain_2x2(m: nn.Module) -> bool:
    return (isinstance(m, nn.MaxPool2d) and _pair(m.kernel_size) == (2, 2) and _pair(m.stride or 2) == (2, 2)
            and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


def pool(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """A channel-local 2-D pooling module on [N, *, H, W] (any number of leading dims)."""
    if _is_plain_2x2(m):
        return maxpool2x2(v)
    lead = v.shape[:-2]
    out = m(v.reshape(-1, 1, *v.shape[-2:]))
    return out.reshape(*lead, *out.shape[-2:])


def bn_uses_batch_stats(m: nn.modules.batchnorm._BatchNorm) -> bool:
    return m.training or m.running_mean is None


def bn_affine(m: nn.modules.batchnorm._BatchNorm, rows: torch.Tensor, ch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale ``a`` and shift ``b`` with BN(row) = row·a + b.

    ``rows`` [R, N]: row r holds all N = B·|sp| values of layer channel ``ch[r]``. Train mode uses
    each row's own (biased) batch statistics, i.e. per perturbation, exactly as a separate forward
    of that perturbed model would; they come from Σx and ‖x‖² in two reads of the rows.
    """
    if bn_uses_batch_stats(m):
        n = rows.shape[1]
        mean = rows.sum(1) / n
        var = (torch.linalg.vector_norm(rows, dim=1).square_() / n - mean * mean).clamp_min_(0.0)
    else:
        mean, var = m.running_mean.index_select(0, ch), m.running_var.index_select(0, ch)
    a = torch.rsqrt(var + m.eps)
    if m.affine:
        a = a * m.weight.index_select(0, ch)
    b = -mean * a
    if m.affine:
        b = b + m.bias.index_select(0, ch)
    return a, b


def bn_rows(m: nn.modules.batchnorm._BatchNorm, rows: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """BatchNorm of ``rows`` [R, N] whose row r is layer channel ``ch[r]`` (see :func:`bn_affine`)."""
    a, b = bn_affine(m, rows, ch)
    return torch.addcmul(b.unsqueeze(1), rows, a.unsqueeze(1))


def bn_relu_maxpool2x2(m: nn.modules.batchnorm._BatchNorm, rep: "Rep") -> "Rep | None":
    """BN → ReLU → 2×2 max-pool in one go: pool first, then normalise the 4× smaller result.

    Exact, not an approximation: with a positive per-channel scale, x ↦ relu(x·a + b) is
    non-decreasing (also in floating point, where every rounding is monotone), so it commutes with
    the maximum. The statistics still come from the unpooled values. Returns None when a scale is
    negative (a γ < 0) — the caller then runs the three layers one by one.
    """
    if isinstance(rep, Chan):
        vals, ch = rep.v, rep.idx
    elif isinstance(rep, Full) and rep.t.dim() == 5:
        vals = rep.t
        ch = torch.arange(vals.shape[1], device=vals.device).repeat(vals.shape[0])
    else:
        return None
    R = ch.numel()
    a, b = bn_affine(m, vals.reshape(R, -1), ch)
    if bool((a < 0).any()):
        return None
    pooled = maxpool2x2(vals)
    out = torch.addcmul(b.unsqueeze(1), pooled.reshape(R, -1), a.unsqueeze(1)).relu_().reshape(pooled.shape)
    return Chan(rep.idx, out) if isinstance(rep, Chan) else Full(out)


def bn_normalized_input(m: nn.modules.batchnorm._BatchNorm, xc: torch.Tensor) -> torch.Tensor:
    """x̂ of the cached input (channel-major [C, B, *sp]), the coefficient of a γ perturbation."""
    C = xc.shape[0]
    rows = xc.reshape(C, -1)
    if bn_uses_batch_stats(m):
        c = rows - rows.mean(1, keepdim=True)
        var = c.square().mean(1, keepdim=True)
        return (c * torch.rsqrt(var + m.eps)).reshape(xc.shape)
    return ((rows - m.running_mean.unsqueeze(1)) * torch.rsqrt(m.running_var.unsqueeze(1) + m.eps)).reshape(xc.shape)


# ---------------------------------------------------------------------------------------------
def conv2d_supported(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def conv_single_channel(m: nn.Conv2d, delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Output change [K, Cout, B, H', W'] when input channel idx[k] changes by delta[k] ([K, B, H, W]).

    im2col of the one changed channel ([K, kh·kw, B·L]) times the weight slice W[:, idx[k]] —
    one batched matmul; cost K·Cout·kh·kw·B·L multiply-adds, the floor for this change.
    """
    K, B, H, W = delta.shape
    (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride)
    (ph, pw), (dh, dw) = _pair(m.padding), _pair(m.dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dp = F.pad(delta, (pw, pw, ph, ph)) if (ph or pw) else delta
    cols = [dp[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    U = torch.stack(cols, 1).reshape(K, kh * kw, B * Ho * Wo)                  # [K, P, B·L]
    w = m.weight.index_select(1, idx).permute(1, 0, 2, 3).reshape(K, m.out_channels, kh * kw)
    return torch.bmm(w, U).reshape(K, m.out_channels, B, Ho, Wo)


def conv_full(m: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    K, C, B = t.shape[:3]
    x = t.transpose(1, 2).reshape(K * B, C, *t.shape[3:])
    out = m(x)
    return out.reshape(K, B, *out.shape[1:]).transpose(1, 2).contiguous()


def propagate_module(m: nn.Module, rep: Rep, xc: torch.Tensor, yc: torch.Tensor, per_sample_dims: int,
                     inplace: bool = False) -> Rep | None:
    """The perturbed output of module ``m`` (None: no closed form here; the caller falls back).

    ``xc``/``yc``: cached input/output, channel-major; ``per_sample_dims``: dims of one sample's input;
    ``inplace``: ``rep``'s tensors are read by nothing else and may be overwritten. An activation
    built with ``inplace=True`` otherwise works on a copy.
    """
    if isinstance(m, nn.ReLU):
        return apply(rep, lambda a: F.relu(a, inplace=inplace))
    if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training):
        return rep
    if isinstance(m, ELEMENTWISE):
        if getattr(m, "inplace", False) and not inplace:
            return apply(rep, lambda a: m(a.clone()))
        return apply(rep, m)
    if isinstance(m, POOLS):
        if per_sample_dims != 3 or isinstance(rep, Feat):
            return None
        return Chan(rep.idx, pool(m, rep.v)) if isinstance(rep, Chan) else Full(pool(m, rep.t))
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if isinstance(rep, Chan):
            return Chan(rep.idx, bn_rows(m, rep.v.reshape(rep.K, -1), rep.idx).reshape(rep.v.shape))
        if isinstance(rep, Feat):
            return Feat(rep.cols, bn_rows(m, rep.v.reshape(-1, rep.v.shape[2]), rep.cols.reshape(-1))
                        .reshape(rep.v.shape))
        if per_sample_dims >= 1:
            K, C = rep.t.shape[:2]
            ch = torch.arange(C, device=rep.t.device).repeat(K)
            return Full(bn_rows(m, rep.t.reshape(K * C, -1), ch).reshape(rep.t.shape))
        return None
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            return None
        if isinstance(rep, Chan):
            K, B = rep.v.shape[:2]
            S = rep.v[0, 0].numel()
            cols = rep.idx.unsqueeze(1) * S + torch.arange(S, device=rep.idx.device)
            v = rep.v.reshape(K, B, S)
            return Feat(cols, v.transpose(1, 2).contiguous() if S > 1 else v.reshape(K, 1, B))
        if isinstance(rep, Full):
            K, C, B = rep.t.shape[:3]
            return Full(rep.t.movedim(2, -1).reshape(K, -1, B))
        return rep
    if conv2d_supported(m):
        if isinstance(rep, Chan):
            delta = rep.v - xc.index_select(0, rep.idx)                          # [K, B, H, W]
            return Full(conv_single_channel(m, delta, rep.idx).add_(yc.unsqueeze(0)))
        if isinstance(rep, Full):
            return Full(conv_full(m, rep.t))
        return None
    if isinstance(m, nn.Linear):
        if isinstance(rep, Feat) and per_sample_dims == 1:
            delta = rep.v - xc[rep.cols]                                         # [K, S, B]
            w = m.weight[:, rep.cols].transpose(0, 1)                            # [K, O, S]
            return Full(torch.bmm(w, delta).add_(yc.unsqueeze(0)))
        if isinstance(rep, Full):
            if per_sample_dims == 1:                                             # t: [K, F, B]
                out = torch.matmul(m.weight, rep.t)
                return Full(out.add_(m.bias.unsqueeze(1)) if m.bias is not None else out)
            return Full(m(rep.t))                                                # feature dim is last
        return None
    return None


# ---------------------------------------------------------------------------------------------
# perturbation sources: coordinates of a layer's own parameters
def conv_weight_source(m: nn.Conv2d, flat_idx: torch.Tensor, h: float, patches: torch.Tensor,
                       yc: torch.Tensor) -> Chan:
    """W[o, c, i, j] += h changes output channel o by h times the (i, j)-shifted input channel c.

    ``patches``: im2col of the cached input in layout [C·kh·kw, B, H', W'].
    """
    per_out = m.weight[0].numel()
    o = torch.div(flat_idx, per_out, rounding_mode="floor")
    rows = flat_idx - o * per_out                                                # c·kh·kw + i·kw + j
    return Chan(o, torch.add(yc.index_select(0, o), patches.index_select(0, rows), alpha=h))


def conv_patches(m: nn.Conv2d, x: torch.Tensor, yshape: torch.Size) -> torch.Tensor:
    """im2col of the cached input ``x`` [B, C, H, W] as [C·kh·kw, B, H', W']."""
    U = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)             # [B, CKK, L]
    return U.transpose(0, 1).reshape(U.shape[1], x.shape[0], *yshape[2:]).contiguous()


def bias_source(flat_idx: torch.Tensor, h: float, yc: torch.Tensor, per_sample_dims: int) -> Rep:
    if per_sample_dims == 1:
        return Feat(flat_idx.unsqueeze(1), (yc.index_select(0, flat_idx) + h).unsqueeze(1))
    return Chan(flat_idx, yc.index_select(0, flat_idx) + h)


def linear_weight_source(m: nn.Linear, flat_idx: torch.Tensor, h: float, xc: torch.Tensor,
                         yc: torch.Tensor) -> Feat:
    """W[i, j] += h changes output unit i by h·x_j."""
    i = torch.div(flat_idx, m.in_features, rounding_mode="floor")
    j = flat_idx - i * m.in_features
    v = torch.add(yc.index_select(0, i), xc.index_select(0, j), alpha=h)        # [K, B]
    return Feat(i.unsqueeze(1), v.unsqueeze(1))


def bn_weight_source(flat_idx: torch.Tensor, h: float, xhat_c: torch.Tensor, yc: torch.Tensor,
                     per_sample_dims: int) -> Rep:
    """γ[c] += h changes channel c by h·x̂_c (the normalised input)."""
    v = torch.add(yc.index_select(0, flat_idx), xhat_c.index_select(0, flat_idx), alpha=h)
    if per_sample_dims == 1:
        return Feat(flat_idx.unsqueeze(1), v.unsqueeze(1))
    return Chan(flat_idx, v)
