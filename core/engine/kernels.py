"""Fused CPU loops for a perturbed conv → BatchNorm → ReLU → 2×2 max-pool block (Numba).

With PyTorch operators alone a perturbed block makes one pass over memory per operator: the
batched matmul writes the conv output rows, BatchNorm's Σx and Σx² read them twice, the 2×2
maximum once more, then scale, shift and ReLU, and the next convolution's layout change. The rows
of K perturbations (K·C·B·H·W values) outgrow the caches, so each pass runs at memory speed, and
together they cost several times the matmul. Here one loop per row computes the row, its Σx and
Σx² and its 2×2 maxima while the values are in registers, then normalises the maxima:

- :func:`block_pool` — the next conv of a one-channel change (:func:`core.engine.blocks.
  chan_through_block`): row o of perturbation k is ``Y[o] + Σ_t W[k, o, t] · U_k[t]``, with U_k the
  one-channel im2col of the change and a 9-tap kernel (unrolled so the loop over windows
  vectorises). The change is formed and gathered once per k into cache-resident buffers, as the
  patches the 2×2 windows read (:func:`core.engine.windows.window_patches`: for a 3×3 kernel with
  stride 1, 16 values per window serve its 36 corner-tap products); the result is written
  channel-major or, when a convolution reads it next, channels-last;
- :func:`rows_pool` — a coordinate's own layer (:mod:`core.engine.sources`): row k is
  ``Y[ch[k]] + h[k] · coef[cidx[k]]``;
- :func:`channels_last_pool` — a block whose every channel changed, after the convolution itself
  (:func:`core.engine.blocks.full_through_block`).

The rows are window-major (:mod:`core.engine.windows`): the 2×2 maximum of a row is the maximum
of its four quarters. Sums accumulate in the rows' dtype across SIMD lanes (rounding of the order
of PyTorch's ``sum``); BatchNorm's mean, variance, scale and shift are formed in float64. Train-
mode BatchNorm uses each perturbation's own statistics, eval mode the running ones.

No Numba (or a GPU tensor, or another dtype): :func:`enabled` is False and the engine uses the
PyTorch operators, which give the same values up to rounding. ``DEEPZERO_KERNELS=0`` in the
environment (or ``core.engine.kernels.use = False``) turns the loops off. The first use per dtype
compiles them (about 5 s on one core) and Numba caches the machine code on disk (next to
:mod:`core.engine._loops`, or in its user cache when that folder is read-only), so later
processes load it in a fraction of a second.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from core.engine import windows as Wn

_BatchNorm = nn.modules.batchnorm._BatchNorm
_DTYPES = (torch.float32, torch.float64)
use = os.environ.get("DEEPZERO_KERNELS", "1") != "0"     # False: always the PyTorch operators


@functools.cache
def _compiled():
    """The compiled loops (block, rows, channels-last), or None when Numba is missing."""
    try:
        from core.engine import _loops
        return _loops.block9, _loops.rows, _loops.channels_last
    except ImportError:
        return None
    except Exception as e:         # e.g. Numba finds no writable cache folder: run without the loops
        warnings.warn(f"the engine's compiled CPU loops are unavailable ({type(e).__name__}: {e}); "
                      "using PyTorch operators (same results, slower)", RuntimeWarning, stacklevel=2)
        return None


def enabled(*tensors: torch.Tensor) -> bool:
    """The loops can run on these tensors (CPU, float32/float64, Numba present and :data:`use` on).

    Not under a ``TorchDispatchMode`` (``FlopCounterMode``, fake tensors, ...): the loops' work
    would be invisible to it, so the engine then runs PyTorch operators, which it sees.
    """
    cpu = all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors)
    return use and cpu and not is_in_torch_dispatch_mode() and _compiled() is not None


def _np(t: torch.Tensor):
    return t.detach().contiguous().numpy()


def _bn(bn: _BatchNorm | None, C: int, dtype: torch.dtype) -> tuple[int, object, object, float]:
    """(mode, γ-or-scale, β-or-shift, eps) of a BatchNorm for the loops (see ``scale_shift``)."""
    if bn is None:
        one = torch.ones(C, dtype=torch.float64).numpy()
        return 0, one, one, 0.0
    w = bn.weight.detach().double() if bn.affine else torch.ones(C, dtype=torch.float64)
    b = bn.bias.detach().double() if bn.affine else torch.zeros(C, dtype=torch.float64)
    if bn.training or bn.running_mean is None:
        return 1, w.numpy(), b.numpy(), float(bn.eps)
    a = w * (bn.running_var.double() + bn.eps).rsqrt()
    return 2, a.numpy(), (b - bn.running_mean.double() * a).numpy(), 0.0


def block_pool(new: torch.Tensor, old: torch.Tensor, ch: torch.Tensor, patches: Wn.WindowPatches,
               W: torch.Tensor, Y: torch.Tensor, pooled: int, bn: _BatchNorm, channels_last: bool,
               out: torch.Tensor | None = None, mean: bool = False) -> torch.Tensor:
    """relu(bn(2×2 max of ``Y + W_k ⊛ (new_k − old[ch_k])``)) for a 9-tap conv: [K, pooled, Cout]
    (``channels_last``, the layout the next convolution reads fastest) or [K, Cout, pooled]; with
    ``mean``, its average over each sample's positions instead, [K, Cout, B] (a global average pool).

    ``new`` [K, B, H, W]: input channel ``ch[k]`` of perturbation k; ``old`` [Cin, B, H, W] the cached
    input; ``patches``: :func:`core.engine.windows.window_patches` of the conv; ``W`` [K, Cout, 9];
    ``Y`` [Cout, N] (window-major rows of the cached conv output). ``out``: where to write.
    """
    K, Cout = W.shape[:2]
    B = new.shape[1]
    if out is None:
        out = new.new_empty(K, Cout, B) if mean else \
            new.new_empty(K, pooled, Cout) if channels_last else new.new_empty(K, Cout, pooled)
    avg, out = (out, out.new_empty(0, 0, 0)) if mean else (out.new_empty(0, 0, 0), out)
    new, old = new.reshape(K, -1), old.reshape(old.shape[0], -1)
    rows, taps, tail, square = patches
    work = (new.new_empty(rows.shape[0], pooled), new.new_empty(*tail.shape), new.new_empty(new.shape[1] + 1),
            new.new_empty(Cout, pooled))
    _compiled()[0](_np(new), _np(old), _np(ch), _np(rows), _np(taps), _np(tail), square, _np(W.to(new.dtype)),
                   _np(Y), pooled, *_bn(bn, Cout, new.dtype), channels_last and not mean,
                   *(w.numpy() for w in work), out.numpy(), avg.numpy())
    return avg if mean else out


def rows_pool(Y: torch.Tensor, ch: torch.Tensor, coef: torch.Tensor, cidx: torch.Tensor, h: torch.Tensor,
              pooled: int, bn: _BatchNorm | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """relu(bn(2×2 max of the rows ``Y[ch[k]] + h[k] · coef[cidx[k]]``)) [K, pooled] (window-major rows)."""
    out = Y.new_empty(ch.shape[0], pooled) if out is None else out
    _compiled()[1](_np(Y), _np(ch), _np(coef), _np(cidx), _np(h.to(Y.dtype)), pooled,
                   *_bn(bn, Y.shape[0], Y.dtype), out.numpy())
    return out


def channels_last_pool(y: torch.Tensor, bn: _BatchNorm, out: torch.Tensor | None = None,
                       mean: bool = False) -> torch.Tensor:
    """relu(bn(2×2 max)) of ``y`` [K, B, H, W, C] (each k normalised with its own statistics):
    [K, B, H/2, W/2, C]; with ``mean``, its average over each sample's positions, [K, B, C]."""
    K, B, H, W, C = y.shape
    out = y.new_empty(K, B, H // 2, W // 2, C) if out is None else out
    avg = y.new_empty(K, B, C) if mean else y.new_empty(0, 0, 0)
    _compiled()[2](_np(y), *_bn(bn, C, y.dtype), out.numpy(), avg.numpy())
    return avg if mean else out
