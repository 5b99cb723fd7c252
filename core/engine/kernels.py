"""Fused CPU loops for the two hot spots of a fused block, compiled by Numba when it is installed.

With PyTorch operators alone a perturbed block makes one pass over memory per operator: the
batched matmul writes the conv output rows, BatchNorm's Σx and Σx² read them twice, the 2×2
maximum once more. The rows of K perturbations (K·C·B·H·W values) outgrow the caches, so each pass
runs at memory speed, and together they cost several times the matmul. Here one loop per row
computes the row, its Σx and Σx², and its 2×2 maxima while the values are in registers:

- :func:`block_pool_sums` — the next conv of a one-channel change (:func:`core.engine.blocks.
  chan_through_block`): row o of perturbation k is ``Y[o] + Σ_t W[k, o, t] · U_k[t]``, with U_k the
  one-channel im2col of the change (gathered once per k into a small buffer) and a 3×3 kernel
  (9 taps, unrolled so the loop over positions vectorises);
- :func:`rows_pool_sums` — a coordinate's own layer (:mod:`core.engine.sources`): row k is
  ``Y[ch[k]] + h[k] · coef[cidx[k]]``.

Both read and write window-major rows (:mod:`core.engine.windows`): the 2×2 maximum of a row is
the maximum of its four quarters. The sums accumulate in the rows' dtype across SIMD lanes and
are returned in float64; their rounding is of the same order as PyTorch's ``sum``.

No Numba (or a GPU tensor, or another dtype): :func:`enabled` is False and the engine uses the
PyTorch operators, which give the same values up to rounding. ``DEEPZERO_KERNELS=0`` in the
environment (or ``core.engine.kernels.use = False``) turns the loops off. The first call per dtype compiles (about a second) and caches the machine code on disk.
"""
from __future__ import annotations

import functools
import os

import torch

_DTYPES = (torch.float32, torch.float64)
use = os.environ.get("DEEPZERO_KERNELS", "1") != "0"     # False: always the PyTorch operators


@functools.cache
def _compiled():
    """The compiled loops, or None when Numba is missing."""
    try:
        import numba
        import numpy as np
    except ImportError:
        return None
    # reassoc/contract: the reductions may use SIMD lanes and FMAs; no 'nnan': a NaN still reaches the sums
    jit = numba.njit(fastmath={"reassoc", "contract", "nsz"}, nogil=True, cache=True)

    @jit
    def gather(d, index, U):                         # U[t, n] = d[index[t, n]]: one-channel im2col
        for t in range(index.shape[0]):
            for n in range(index.shape[1]):
                U[t, n] = d[index[t, n]]

    @jit
    def tail(y, u0, u1, u2, u3, u4, u5, u6, u7, u8, w):
        """(Σ, Σ²) of the positions no window covers (odd sides); 1-D slices from 0 vectorise."""
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
        a1 = w0 - w0
        a2 = a1
        for m in range(y.shape[0]):
            r = y[m] + w0 * u0[m] + w1 * u1[m] + w2 * u2[m] + w3 * u3[m] + w4 * u4[m] \
                + w5 * u5[m] + w6 * u6[m] + w7 * u7[m] + w8 * u8[m]
            a1 += r
            a2 += r * r
        return a1, a2

    @jit
    def conv9(U, W, Y, P, top, s1, s2):             # one perturbation: W [Cout, 9], U [9, N]
        u0, u1, u2, u3, u4, u5, u6, u7, u8 = U[0], U[1], U[2], U[3], U[4], U[5], U[6], U[7], U[8]
        for o in range(W.shape[0]):
            w = W[o]
            w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
            y = Y[o]
            tk = top[o]
            a1 = y[0] - y[0]                         # zero in the rows' dtype
            a2 = a1
            for n in range(P):
                m = n + P
                r0 = y[n] + w0 * u0[n] + w1 * u1[n] + w2 * u2[n] + w3 * u3[n] + w4 * u4[n] \
                    + w5 * u5[n] + w6 * u6[n] + w7 * u7[n] + w8 * u8[n]
                r1 = y[m] + w0 * u0[m] + w1 * u1[m] + w2 * u2[m] + w3 * u3[m] + w4 * u4[m] \
                    + w5 * u5[m] + w6 * u6[m] + w7 * u7[m] + w8 * u8[m]
                m += P
                r2 = y[m] + w0 * u0[m] + w1 * u1[m] + w2 * u2[m] + w3 * u3[m] + w4 * u4[m] \
                    + w5 * u5[m] + w6 * u6[m] + w7 * u7[m] + w8 * u8[m]
                m += P
                r3 = y[m] + w0 * u0[m] + w1 * u1[m] + w2 * u2[m] + w3 * u3[m] + w4 * u4[m] \
                    + w5 * u5[m] + w6 * u6[m] + w7 * u7[m] + w8 * u8[m]
                tk[n] = max(max(r0, r1), max(r2, r3))
                a1 += (r0 + r1) + (r2 + r3)
                a2 += (r0 * r0 + r1 * r1) + (r2 * r2 + r3 * r3)
            e = 4 * P
            b1, b2 = tail(y[e:], u0[e:], u1[e:], u2[e:], u3[e:], u4[e:], u5[e:], u6[e:], u7[e:], u8[e:], w)
            s1[o] = a1 + b1
            s2[o] = a2 + b2

    @jit
    def block9(delta, index, W, Y, P, top, s1, s2):
        U = np.empty((9, Y.shape[1]), dtype=delta.dtype)    # one perturbation's im2col stays in cache
        d = np.zeros(delta.shape[1] + 1, dtype=delta.dtype)   # the change, then the padding's zero
        for k in range(W.shape[0]):
            d[:-1] = delta[k]
            gather(d, index, U)
            conv9(U, W[k], Y, P, top[k], s1[k], s2[k])

    @jit
    def rows(Y, ch, coef, cidx, h, P, top, s1, s2):
        K = ch.shape[0]
        N = Y.shape[1]
        for k in range(K):
            y = Y[ch[k]]
            c = coef[cidx[k]]
            hk = h[k]
            tk = top[k]
            a1 = y[0] - y[0]
            a2 = a1
            for n in range(P):
                r0 = y[n] + hk * c[n]
                r1 = y[n + P] + hk * c[n + P]
                r2 = y[n + 2 * P] + hk * c[n + 2 * P]
                r3 = y[n + 3 * P] + hk * c[n + 3 * P]
                tk[n] = max(max(r0, r1), max(r2, r3))
                a1 += (r0 + r1) + (r2 + r3)
                a2 += (r0 * r0 + r1 * r1) + (r2 * r2 + r3 * r3)
            yt, ct = y[4 * P:], c[4 * P:]
            b1 = a1 - a1
            b2 = b1
            for m in range(N - 4 * P):
                r = yt[m] + hk * ct[m]
                b1 += r
                b2 += r * r
            s1[k] = a1 + b1
            s2[k] = a2 + b2

    return block9, rows


def enabled(*tensors: torch.Tensor) -> bool:
    """The loops can run on these tensors (CPU, float32/float64, Numba present and :data:`use` on)."""
    return use and all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors) and _compiled() is not None


def _np(t: torch.Tensor):
    return t.contiguous().numpy()


def block_pool_sums(delta: torch.Tensor, index: torch.Tensor, W: torch.Tensor, Y: torch.Tensor,
                    pooled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a 3×3 conv: 2×2 maxima [K, Cout, pooled], Σ and Σ² [K, Cout] (float64) of ``Y + W_k ⊛ delta_k``.

    ``delta`` [K, B·H·W] (one input channel per perturbation), ``index`` the window-major gather
    index [9·N] (:func:`core.engine.windows.conv_gather_index`), ``W`` [K, Cout, 9], ``Y`` [Cout, N].
    """
    K, Cout = W.shape[:2]
    top = delta.new_empty(K, Cout, pooled)
    s1 = torch.empty(K, Cout, dtype=torch.float64)
    s2 = torch.empty(K, Cout, dtype=torch.float64)
    _compiled()[0](_np(delta.reshape(K, -1)), _np(index.view(9, -1)), _np(W.to(delta.dtype)), _np(Y), pooled,
                   top.numpy(), s1.numpy(), s2.numpy())
    return top, s1, s2


def rows_pool_sums(Y: torch.Tensor, ch: torch.Tensor, coef: torch.Tensor, cidx: torch.Tensor, h: torch.Tensor,
                   pooled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2×2 maxima [K, pooled], Σ and Σ² [K] (float64) of the rows ``Y[ch[k]] + h[k] · coef[cidx[k]]``."""
    K = ch.shape[0]
    top = Y.new_empty(K, pooled)
    s1 = torch.empty(K, dtype=torch.float64)
    s2 = torch.empty(K, dtype=torch.float64)
    _compiled()[1](_np(Y), _np(ch), _np(coef), _np(cidx), _np(h.to(Y.dtype)), pooled,
                   top.numpy(), s1.numpy(), s2.numpy())
    return top, s1, s2
