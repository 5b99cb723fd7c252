"""Forward passes at inference memory: BatchNorm and ReLU applied in place.

A forward-only training step (MeZO, Malladi et al. 2023, "Fine-Tuning Language Models with Just
Forward Passes") needs no activations for a backward pass, yet a plain ``model(x)`` under
``torch.no_grad()`` still holds two feature maps at once in every conv → BN → ReLU block: the
convolution's output while BatchNorm writes a new tensor, then BatchNorm's while ReLU writes
another — and the convolution and pooling kernels themselves allocate a full-size temporary
(oneDNN's output reorder, max pooling's indices). :func:`lean_forward` runs the same layers with
the batch travelling as slices: every per-sample layer (convolution, pooling, linear, ReLU) maps
one slice at a time, freeing its input slice as it goes, and BatchNorm — the one layer that needs
the whole batch — gathers only its statistics across the slices, then normalises every slice in
place. The peak is then about one full-size feature map (the largest layer's output) instead of
two to three: a forward-only step at about a third of backprop's memory on small CNNs.

In place only where that is safe: on tensors this walk created itself (never the caller's input),
produced by layers whose output is known to be fresh (convolutions, linear layers, pooling,
:class:`~core.models.normalize.Normalize`), in models without forward hooks (a hook could keep the
tensor). Any other module is called as usual and its output is treated as shared. BatchNorm in
training mode uses the batch's statistics and updates its running statistics exactly as PyTorch's
BatchNorm does (momentum or cumulative average, unbiased running variance); the result equals
``model(x)`` up to float rounding (the affine map is applied in a different order).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from core.models.normalize import Normalize

_SLICES = 8        # the batch travels as 8 slices

# Per-sample layers whose output is a new tensor that nothing else references (exact types: a
# subclass may override forward and return something shared).
_FRESH = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear,
          nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
          Normalize)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def supports_lean(model: nn.Module) -> bool:
    """Whether :func:`lean_forward` can save memory on ``model``: a hook-free ``nn.Sequential`` tree."""
    if not isinstance(model, nn.Sequential) or _has_global_hooks():
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def lean_forward(model: nn.Module, x: torch.Tensor, *, slices: int = _SLICES) -> torch.Tensor:
    """``model(x)`` without autograd, the batch in ``slices`` slices, BatchNorm and ReLU in place.

    Falls back to ``model(x)`` when the model is not a hook-free ``nn.Sequential`` tree
    (:func:`supports_lean`). The caller's ``x`` is never written; the model's BatchNorm running
    statistics move exactly as in ``model(x)``. Layers other than the per-sample ones above and
    BatchNorm see the whole batch (the slices are joined for them).
    """
    if not supports_lean(model):
        return model(x)
    largest = [0]
    parts, _ = _run(model, list(x.tensor_split(min(slices, max(1, x.shape[0])))), owned=False, largest=largest)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _run(module: nn.Module, parts: list[torch.Tensor], *, owned: bool,
         largest: list[int]) -> tuple[list[torch.Tensor], bool]:
    """Apply ``module`` to the sliced batch; ``owned``: no one else holds these slices.

    Once the maps have shrunk to a quarter of the largest seen (after pooling), the slices are
    joined: slicing saves nothing more there and every slice costs a kernel call.
    """
    if type(module) is nn.Sequential:
        for child in module:
            parts, owned = _run(child, parts, owned=owned, largest=largest)
            size = sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
            largest[0] = max(largest[0], size)
            if len(parts) > 1 and owned and 4 * size <= largest[0]:
                parts = [torch.cat(parts)]
        return parts, owned
    kind = type(module)
    if kind is nn.ReLU:
        for i, p in enumerate(parts):
            parts[i] = p.relu_() if owned else p.relu()
        return parts, True
    if kind in _BN and parts[0].is_floating_point():
        _batch_norm(module, parts, inplace=owned)
        return parts, True
    if (kind in _FRESH or kind is nn.Flatten) and not getattr(module, "return_indices", False):
        for i, p in enumerate(parts):           # slice i's input is freed as its output is made
            parts[i] = module(p)
        return parts, owned if kind is nn.Flatten else True
    whole = parts[0] if len(parts) == 1 else torch.cat(parts)
    parts.clear()
    return [module(whole)], False


def _batch_norm(bn: _BatchNorm, parts: list[torch.Tensor], *, inplace: bool) -> None:
    """``parts ← bn(cat(parts))`` slice by slice, with the running-statistics update of ``bn.forward``."""
    ref = parts[0]
    shape = [1, -1] + [1] * (ref.dim() - 2)
    bn._check_input_dim(ref)                     # e.g. a BatchNorm2d given 3-D input raises as in bn(x)
    if bn.training or bn.running_mean is None:
        mean, var, n = _moments(parts)
        if n == 1:                               # as BatchNorm itself refuses (batch statistics of one value)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{[sum(p.shape[0] for p in parts), *ref.shape[1:]]}")
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.to(ref.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_((var * (n / max(n - 1, 1))).to(ref.dtype), alpha=factor)
        mean, var = mean.to(ref.dtype), var.to(ref.dtype)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    scale, shift = scale.view(shape), shift.view(shape)
    for i, p in enumerate(parts):
        parts[i] = p.mul_(scale).add_(shift) if inplace else p * scale + shift


def _moments(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of the joined slices (two passes), and the count per channel.

    Rows (sample, channel) are reduced over their contiguous positions with sums and norms (several
    times faster on CPU than ``var_mean``'s strided Welford reduction); row results add up in float64.
    """
    c = parts[0].shape[1]
    rows = [p.reshape(p.shape[0], c, -1) for p in parts]
    n = sum(r.shape[0] * r.shape[2] for r in rows)
    wide = torch.float32 if rows[0].dtype in (torch.float16, torch.bfloat16) else None   # no fp16 overflow
    mean = sum(r.sum(dim=2, dtype=wide).double().sum(0) for r in rows) / n
    centre = mean.to(rows[0].dtype).view(1, c, 1)
    var = sum(torch.linalg.vector_norm(r - centre, dim=2, dtype=wide).double().square().sum(0) for r in rows) / n
    return mean, var, n


def _has_global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)
