"""The compiled loops behind :mod:`core.engine.kernels` (imported only when Numba is installed).

Module-level functions, so Numba's on-disk cache finds them again in the next process; one file,
because that cache checks only the file of the function it loads: a loop here calling a helper from
another file would keep running a stale compiled copy after the helper changed.
"""
import numba
import numpy as np

# reassoc/contract: the reductions may use SIMD lanes and FMAs; no 'nnan': a NaN still reaches the sums
jit = numba.njit(fastmath={"reassoc", "contract", "nsz"}, nogil=True, cache=True)
inlined = numba.njit(fastmath={"reassoc", "contract", "nsz"}, nogil=True, cache=True, inline="always")


@jit
def scale_shift(mode, s1, s2, n, g, b, eps, pooled):
    """(a, b) with BN(x) = a·x + b for one row: mode 0 none, 1 batch statistics, 2 given (g, b).

    A NaN the pooling reads makes the whole row NaN: the 2×2 maxima, which may pass over a NaN,
    must not hide it (the loss is then NaN, as through the layers). ``pooled``: the Σ of the
    positions the windows cover; with batch statistics (mode 1) a NaN anywhere (``s1``) counts,
    otherwise only one the pooling reads (the layers drop the rest).
    """
    if (s1 if mode == 1 else pooled) != (s1 if mode == 1 else pooled):
        return s1 + pooled, s1 + pooled
    if mode == 0:
        return 1.0, 0.0
    if mode == 2:
        return g, b
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    a = g / np.sqrt(var + eps)
    return a, b - mean * a


@jit
def relu(v, zero):
    return v if not v < 0 else zero              # a NaN stays NaN; −inf gives 0, as in torch




@jit
def gather(d, index, U):                         # U[t, n] = d[index[t, n]]: one-channel im2col
    for t in range(index.shape[0]):
        for n in range(index.shape[1]):
            U[t, n] = d[index[t, n]]


@jit
def tail2(y, z, T, w, v, zero):
    """(Σ, Σ²) of two output channels (weights ``w``, ``v``; cached rows ``y``, ``z``) at the
    positions no window covers (odd sides); ``T`` [9, n] their im2col, each value loaded once."""
    u0, u1, u2, u3, u4, u5, u6, u7, u8 = T[0], T[1], T[2], T[3], T[4], T[5], T[6], T[7], T[8]
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    v0, v1, v2, v3, v4, v5, v6, v7, v8 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]
    a1, a2, c1, c2 = zero, zero, zero, zero
    for m in range(y.shape[0]):
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = u0[m], u1[m], u2[m], u3[m], u4[m], u5[m], u6[m], u7[m], u8[m]
        r = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        a1 += r
        a2 += r * r
        c1 += q
        c2 += q * q
    return a1, a2, c1, c2


# two16/two_any spell out the four corners of each 2×2 window: as a loop over the corners, LLVM no
# longer vectorises the loop over windows (measured 2× slower).


@jit
def two16(V, w, v, y, z, P, tk, tl, zero):
    """Output channels with weights ``w``, ``v`` [9] and cached rows ``y``, ``z`` of a 3×3 conv with
    stride 1: 2×2 maxima into ``tk``, ``tl`` and (Σ, Σ²) of each. ``V`` [16, P]: the 4×4 input patch
    of every window, row 4a + b; each value is loaded once for 4 corners × 9 taps × 2 channels."""
    V00, V01, V02, V03, V10, V11, V12, V13 = V[0], V[1], V[2], V[3], V[4], V[5], V[6], V[7]
    V20, V21, V22, V23, V30, V31, V32, V33 = V[8], V[9], V[10], V[11], V[12], V[13], V[14], V[15]
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    v0, v1, v2, v3, v4, v5, v6, v7, v8 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]
    a1, a2, c1, c2 = zero, zero, zero, zero
    for n in range(P):
        p00, p01, p02, p03 = V00[n], V01[n], V02[n], V03[n]
        p10, p11, p12, p13 = V10[n], V11[n], V12[n], V13[n]
        p20, p21, p22, p23 = V20[n], V21[n], V22[n], V23[n]
        p30, p31, p32, p33 = V30[n], V31[n], V32[n], V33[n]
        r0 = y[n] + w0 * p00 + w1 * p01 + w2 * p02 + w3 * p10 + w4 * p11 + w5 * p12 + w6 * p20 + w7 * p21 + w8 * p22
        q0 = z[n] + v0 * p00 + v1 * p01 + v2 * p02 + v3 * p10 + v4 * p11 + v5 * p12 + v6 * p20 + v7 * p21 + v8 * p22
        m = n + P
        r1 = y[m] + w0 * p01 + w1 * p02 + w2 * p03 + w3 * p11 + w4 * p12 + w5 * p13 + w6 * p21 + w7 * p22 + w8 * p23
        q1 = z[m] + v0 * p01 + v1 * p02 + v2 * p03 + v3 * p11 + v4 * p12 + v5 * p13 + v6 * p21 + v7 * p22 + v8 * p23
        m += P
        r2 = y[m] + w0 * p10 + w1 * p11 + w2 * p12 + w3 * p20 + w4 * p21 + w5 * p22 + w6 * p30 + w7 * p31 + w8 * p32
        q2 = z[m] + v0 * p10 + v1 * p11 + v2 * p12 + v3 * p20 + v4 * p21 + v5 * p22 + v6 * p30 + v7 * p31 + v8 * p32
        m += P
        r3 = y[m] + w0 * p11 + w1 * p12 + w2 * p13 + w3 * p21 + w4 * p22 + w5 * p23 + w6 * p31 + w7 * p32 + w8 * p33
        q3 = z[m] + v0 * p11 + v1 * p12 + v2 * p13 + v3 * p21 + v4 * p22 + v5 * p23 + v6 * p31 + v7 * p32 + v8 * p33
        tk[n] = max(max(r0, r1), max(r2, r3))
        tl[n] = max(max(q0, q1), max(q2, q3))
        a1 += (r0 + r1) + (r2 + r3)
        a2 += (r0 * r0 + r1 * r1) + (r2 * r2 + r3 * r3)
        c1 += (q0 + q1) + (q2 + q3)
        c2 += (q0 * q0 + q1 * q1) + (q2 * q2 + q3 * q3)
    return a1, a2, c1, c2


@jit
def nine(V, t):
    return V[t[0]], V[t[1]], V[t[2]], V[t[3]], V[t[4]], V[t[5]], V[t[6]], V[t[7]], V[t[8]]


@jit
def two_any(V, taps, w, v, y, z, P, tk, tl, zero):
    """:func:`two16` for any 9-tap geometry: corner q reads patch rows ``taps[q]`` (36 row loads)."""
    a0, a1_, a2_, a3, a4, a5, a6, a7, a8 = nine(V, taps[0])
    b0, b1, b2, b3, b4, b5, b6, b7, b8 = nine(V, taps[1])
    c0, c1_, c2_, c3, c4, c5, c6, c7, c8 = nine(V, taps[2])
    d0, d1, d2, d3, d4, d5, d6, d7, d8 = nine(V, taps[3])
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    v0, v1, v2, v3, v4, v5, v6, v7, v8 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]
    s1, s2, t1, t2 = zero, zero, zero, zero
    for n in range(P):
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = a0[n], a1_[n], a2_[n], a3[n], a4[n], a5[n], a6[n], a7[n], a8[n]
        r0 = y[n] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q0 = z[n] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = b0[n], b1[n], b2[n], b3[n], b4[n], b5[n], b6[n], b7[n], b8[n]
        m = n + P
        r1 = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q1 = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = c0[n], c1_[n], c2_[n], c3[n], c4[n], c5[n], c6[n], c7[n], c8[n]
        m += P
        r2 = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q2 = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = d0[n], d1[n], d2[n], d3[n], d4[n], d5[n], d6[n], d7[n], d8[n]
        m += P
        r3 = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q3 = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        tk[n] = max(max(r0, r1), max(r2, r3))
        tl[n] = max(max(q0, q1), max(q2, q3))
        s1 += (r0 + r1) + (r2 + r3)
        s2 += (r0 * r0 + r1 * r1) + (r2 * r2 + r3 * r3)
        t1 += (q0 + q1) + (q2 + q3)
        t2 += (q0 * q0 + q1 * q1) + (q2 * q2 + q3 * q3)
    return s1, s2, t1, t2


@jit
def block9(v, x, ch, rows, taps, tail_index, square, W, Y, P, mode, g, bb, eps, last, V, T, d, top, out, avg):
    """out[k] = relu(BN(2×2 max of Y + W[k] ⊛ (v[k] − x[ch[k]]))): [P, Cout] (``last``) or [Cout, P];
    or, when ``avg`` [K, Cout, B] is not empty, its mean over each sample's positions into ``avg[k]``
    (a global average pool next; ``out`` is then not written).

    ``v`` [K, M] the new input channel of each perturbation, ``x`` [Cin, M] the cached input (M =
    B·H·W); ``rows``, ``taps``, ``tail_index``, ``square``: :class:`core.engine.windows.WindowPatches`.
    Work buffers from the caller (so that PyTorch's memory accounting sees them): ``V`` [R, P], one
    perturbation's window patches, and ``T`` [9, N − 4P], its im2col at the positions no window
    covers, both in cache; ``d`` [M + 1], its change and then the padding's zero; ``top`` [Cout, P],
    its 2×2 maxima.
    """
    K, Cout = W.shape[0], W.shape[1]
    M, N = v.shape[1], Y.shape[1]
    e = 4 * P
    d[M] = 0
    zero = d[M]
    s1 = np.empty(Cout)
    s2 = np.empty(Cout)
    covered = np.empty(Cout)                         # Σ of the positions the windows cover
    a = np.empty(Cout, dtype=v.dtype)
    b = np.empty(Cout, dtype=v.dtype)
    for k in range(K):
        vk, xk = v[k], x[ch[k]]
        for i in range(M):
            d[i] = vk[i] - xk[i]
        gather(d, rows, V)
        gather(d, tail_index, T)
        Wk = W[k]
        for o in range(0, Cout, 2):
            p = min(o + 1, Cout - 1)                 # an odd last channel is computed twice
            if square:
                s1[o], s2[o], s1[p], s2[p] = two16(V, Wk[o], Wk[p], Y[o], Y[p], P, top[o], top[p], zero)
            else:
                s1[o], s2[o], s1[p], s2[p] = two_any(V, taps, Wk[o], Wk[p], Y[o], Y[p], P, top[o], top[p], zero)
            covered[o], covered[p] = s1[o], s1[p]
            if e < N:
                t1, t2, u1, u2 = tail2(Y[o][e:], Y[p][e:], T, Wk[o], Wk[p], zero)
                s1[o] += t1
                s2[o] += t2
                if p != o:
                    s1[p] += u1
                    s2[p] += u2
        for o in range(Cout):
            a[o], b[o] = scale_shift(mode, s1[o], s2[o], N, g[o], bb[o], eps, covered[o])
        if avg.shape[0] or last:                     # normalise in place, then average or transpose
            for o in range(Cout):
                ao, bo, to = a[o], b[o], top[o]
                for q in range(P):
                    to[q] = relu(ao * to[q] + bo, zero)
        if avg.shape[0]:
            B = avg.shape[2]
            S = P // B
            for o in range(Cout):
                to, ao = top[o], avg[k, o]
                for i in range(B):
                    ao[i] = zero
                for j in range(S):                   # strided over the samples: vectorises
                    for i in range(B):
                        ao[i] += to[i * S + j]
                for i in range(B):
                    ao[i] /= S
            continue
        ok = out[k]
        if last:
            for q in range(P):
                for o in range(Cout):
                    ok[q, o] = top[o, q]
        else:
            for o in range(Cout):
                ao, bo, to, oo = a[o], b[o], top[o], ok[o]
                for q in range(P):
                    oo[q] = relu(ao * to[q] + bo, zero)


@jit
def rows(Y, ch, coef, cidx, h, P, mode, g, bb, eps, out):
    """out[k] [P] = relu(BN(2×2 max of Y[ch[k]] + h[k] · coef[cidx[k]])) (BN of channel ch[k])."""
    K = ch.shape[0]
    N = Y.shape[1]
    ab = np.zeros(2, dtype=Y.dtype)                # the row's scale and shift in the rows' dtype
    zero = ab[0]
    for k in range(K):
        y = Y[ch[k]]
        c = coef[cidx[k]]
        hk = h[k]
        ok = out[k]
        a1 = zero
        a2 = zero
        for n in range(P):
            r0 = y[n] + hk * c[n]
            r1 = y[n + P] + hk * c[n + P]
            r2 = y[n + 2 * P] + hk * c[n + 2 * P]
            r3 = y[n + 3 * P] + hk * c[n + 3 * P]
            ok[n] = max(max(r0, r1), max(r2, r3))
            a1 += (r0 + r1) + (r2 + r3)
            a2 += (r0 * r0 + r1 * r1) + (r2 * r2 + r3 * r3)
        yt, ct = y[4 * P:], c[4 * P:]
        b1 = zero
        b2 = zero
        for m in range(N - 4 * P):
            r = yt[m] + hk * ct[m]
            b1 += r
            b2 += r * r
        ab[0], ab[1] = scale_shift(mode, a1 + b1, a2 + b2, N, g[ch[k]], bb[ch[k]], eps, a1)
        a, b = ab[0], ab[1]
        for n in range(P):
            ok[n] = relu(a * ok[n] + b, zero)


@inlined                          # a compiled call per row made channels_last 40% slower; inlined, 5%
def channel_sums(row, j0, j1, t1, t2):
    """Add Σx and Σx² of positions j0..j1−1 of a channels-last row [W, C] into ``t1``, ``t2`` [C]."""
    for j in range(j0, j1):
        v = row[j]
        for c in range(t1.shape[0]):
            t1[c] += v[c]
            t2[c] += v[c] * v[c]


@jit
def channels_last(y, mode, g, bb, eps, out, avg):
    """out[k] [B, H/2, W/2, C] = relu(BN(2×2 max of y[k] [B, H, W, C])), statistics over all of y[k];
    and, when ``avg`` [K, B, C] is not empty, its mean over each sample's positions into ``avg[k]``."""
    K, B, H, W, C = y.shape
    h, w = H // 2, W // 2
    n = B * H * W
    s1 = np.empty(C)
    s2 = np.empty(C)
    covered = np.empty(C)                          # Σ of the positions the windows cover
    t1 = np.empty(C, dtype=y.dtype)                # one sample's sums in the rows' dtype (vectorised),
    t2 = np.empty(C, dtype=y.dtype)                # added up over the samples in float64
    a = np.zeros(C, dtype=y.dtype)
    b = np.empty(C, dtype=y.dtype)
    zero = a[0]
    for k in range(K):
        yk, ok = y[k], out[k]
        s1[:] = 0.0
        s2[:] = 0.0
        covered[:] = 0.0
        for bi in range(B):
            t1[:] = zero
            t2[:] = zero
            for i in range(2 * h):
                channel_sums(yk[bi, i], 0, 2 * w, t1, t2)
            for c in range(C):
                covered[c] += t1[c]
            for i in range(H):                     # the positions no window covers (odd sides)
                channel_sums(yk[bi, i], 2 * w if i < 2 * h else 0, W, t1, t2)
            for c in range(C):
                s1[c] += t1[c]
                s2[c] += t2[c]
            for i in range(h):
                r0, r1 = yk[bi, 2 * i], yk[bi, 2 * i + 1]
                orow = ok[bi, i]
                for j in range(w):
                    p, q, r, s, t = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], orow[j]
                    for c in range(C):
                        t[c] = max(max(p[c], q[c]), max(r[c], s[c]))
        for c in range(C):
            a[c], b[c] = scale_shift(mode, s1[c], s2[c], n, g[c], bb[c], eps, covered[c])
        flat = ok.reshape(-1, C)
        for p in range(flat.shape[0]):
            for c in range(C):
                flat[p, c] = relu(a[c] * flat[p, c] + b[c], zero)
        if avg.shape[0]:
            S = h * w
            for bi in range(B):
                ak = avg[k, bi]
                ak[:] = zero
                for p in range(bi * S, bi * S + S):
                    for c in range(C):
                        ak[c] += flat[p, c]
                for c in range(C):
                    ak[c] /= S
