"""The compiled loops behind :mod:`core.engine.kernels` (imported only when Numba is installed).

Module-level functions, so Numba's on-disk cache finds them again in the next process.
"""
import numba
import numpy as np

# reassoc/contract: the reductions may use SIMD lanes and FMAs; no 'nnan': a NaN still reaches the sums
jit = numba.njit(fastmath={"reassoc", "contract", "nsz"}, nogil=True, cache=True)


@jit
def scale_shift(mode, s1, s2, n, g, b, eps):
    """(a, b) with BN(x) = a·x + b for one row: mode 0 none, 1 batch statistics, 2 given (g, b).

    A NaN in the row (its Σ is NaN) makes the whole row NaN in every mode: the 2×2 maxima, which
    may pass over a NaN, must not hide it (the loss is then NaN, as through the layers).
    """
    if s1 != s1:
        return s1, s1
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
def tail(y, u0, u1, u2, u3, u4, u5, u6, u7, u8, w, zero):
    """(Σ, Σ²) of the positions no window covers (odd sides); 1-D slices from 0 vectorise."""
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    a1 = zero
    a2 = zero
    for m in range(y.shape[0]):
        r = y[m] + w0 * u0[m] + w1 * u1[m] + w2 * u2[m] + w3 * u3[m] + w4 * u4[m] \
            + w5 * u5[m] + w6 * u6[m] + w7 * u7[m] + w8 * u8[m]
        a1 += r
        a2 += r * r
    return a1, a2


# one9/two9 spell out the four quarters of each 2×2 window: as a loop over the quarters, LLVM no
# longer vectorises the loop over positions (measured 2× slower).


@jit
def one9(U, w, y, P, tk, zero):
    """Output channel with weights ``w`` [9] and cached row ``y``: 2×2 maxima into ``tk``, (Σ, Σ²)."""
    u0, u1, u2, u3, u4, u5, u6, u7, u8 = U[0], U[1], U[2], U[3], U[4], U[5], U[6], U[7], U[8]
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    a1 = zero
    a2 = zero
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
    b1, b2 = tail(y[e:], u0[e:], u1[e:], u2[e:], u3[e:], u4[e:], u5[e:], u6[e:], u7[e:], u8[e:], w, zero)
    return a1 + b1, a2 + b2


@jit
def two9(U, w, v, y, z, P, tk, tl, zero):
    """Two output channels at once (weights ``w``, ``v``): each im2col value is loaded once for both."""
    u0, u1, u2, u3, u4, u5, u6, u7, u8 = U[0], U[1], U[2], U[3], U[4], U[5], U[6], U[7], U[8]
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    v0, v1, v2, v3, v4, v5, v6, v7, v8 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]
    a1, a2, c1, c2 = zero, zero, zero, zero
    for n in range(P):
        m = n
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = u0[m], u1[m], u2[m], u3[m], u4[m], u5[m], u6[m], u7[m], u8[m]
        r0 = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q0 = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        m += P
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = u0[m], u1[m], u2[m], u3[m], u4[m], u5[m], u6[m], u7[m], u8[m]
        r1 = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q1 = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        m += P
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = u0[m], u1[m], u2[m], u3[m], u4[m], u5[m], u6[m], u7[m], u8[m]
        r2 = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q2 = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        m += P
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = u0[m], u1[m], u2[m], u3[m], u4[m], u5[m], u6[m], u7[m], u8[m]
        r3 = y[m] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7 + w8 * x8
        q3 = z[m] + v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7 + v8 * x8
        tk[n] = max(max(r0, r1), max(r2, r3))
        tl[n] = max(max(q0, q1), max(q2, q3))
        a1 += (r0 + r1) + (r2 + r3)
        a2 += (r0 * r0 + r1 * r1) + (r2 * r2 + r3 * r3)
        c1 += (q0 + q1) + (q2 + q3)
        c2 += (q0 * q0 + q1 * q1) + (q2 * q2 + q3 * q3)
    e = 4 * P
    b1, b2 = tail(y[e:], u0[e:], u1[e:], u2[e:], u3[e:], u4[e:], u5[e:], u6[e:], u7[e:], u8[e:], w, zero)
    d1, d2 = tail(z[e:], u0[e:], u1[e:], u2[e:], u3[e:], u4[e:], u5[e:], u6[e:], u7[e:], u8[e:], v, zero)
    return a1 + b1, a2 + b2, c1 + d1, c2 + d2


@jit
def conv9(U, W, Y, P, top, s1, s2, zero):
    """One perturbation: W [Cout, 9], U [9, N] -> 2×2 maxima ``top`` [Cout, P], Σ and Σ² [Cout]."""
    Cout = W.shape[0]
    for o in range(0, Cout - 1, 2):
        s1[o], s2[o], s1[o + 1], s2[o + 1] = two9(U, W[o], W[o + 1], Y[o], Y[o + 1], P, top[o], top[o + 1], zero)
    if Cout % 2:
        s1[Cout - 1], s2[Cout - 1] = one9(U, W[Cout - 1], Y[Cout - 1], P, top[Cout - 1], zero)


@jit
def block9(delta, index, W, Y, P, mode, g, bb, eps, last, U, d, top, out):
    """out[k] = relu(BN(2×2 max of Y + W[k] ⊛ delta[k])): [P, Cout] (``last``) or [Cout, P].

    Work buffers from the caller (so that PyTorch's memory accounting sees them): ``U`` [9, N], one
    perturbation's im2col, which stays in cache; ``d`` [B·H·W + 1], its change and then the padding's
    zero; ``top`` [Cout, P], its 2×2 maxima.
    """
    K, Cout = W.shape[0], W.shape[1]
    N = Y.shape[1]
    d[-1] = 0
    zero = d[-1]
    s1 = np.empty(Cout)
    s2 = np.empty(Cout)
    a = np.empty(Cout, dtype=delta.dtype)
    b = np.empty(Cout, dtype=delta.dtype)
    for k in range(K):
        d[:-1] = delta[k]
        gather(d, index, U)
        conv9(U, W[k], Y, P, top, s1, s2, zero)
        for o in range(Cout):
            a[o], b[o] = scale_shift(mode, s1[o], s2[o], N, g[o], bb[o], eps)
        ok = out[k]
        if last:
            for p in range(P):
                for o in range(Cout):
                    ok[p, o] = relu(a[o] * top[o, p] + b[o], zero)
        else:
            for o in range(Cout):
                ao, bo, to, oo = a[o], b[o], top[o], ok[o]
                for p in range(P):
                    oo[p] = relu(ao * to[p] + bo, zero)


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
        ab[0], ab[1] = scale_shift(mode, a1 + b1, a2 + b2, N, g[ch[k]], bb[ch[k]], eps)
        a, b = ab[0], ab[1]
        for n in range(P):
            ok[n] = relu(a * ok[n] + b, zero)


@jit
def channels_last(y, mode, g, bb, eps, out):
    """out[k] [B, H/2, W/2, C] = relu(BN(2×2 max of y[k] [B, H, W, C])), statistics over all of y[k]."""
    K, B, H, W, C = y.shape
    h, w = H // 2, W // 2
    n = B * H * W
    s1 = np.empty(C)
    s2 = np.empty(C)
    a = np.zeros(C, dtype=y.dtype)
    b = np.empty(C, dtype=y.dtype)
    zero = a[0]
    for k in range(K):
        yk, ok = y[k], out[k]
        s1[:] = 0.0
        s2[:] = 0.0
        for bi in range(B):
            for i in range(H):
                row = yk[bi, i]
                for j in range(W):
                    v = row[j]
                    for c in range(C):
                        s1[c] += v[c]
                        s2[c] += v[c] * v[c]
            for i in range(h):
                r0, r1 = yk[bi, 2 * i], yk[bi, 2 * i + 1]
                orow = ok[bi, i]
                for j in range(w):
                    p, q, r, s, t = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], orow[j]
                    for c in range(C):
                        t[c] = max(max(p[c], q[c]), max(r[c], s[c]))
        for c in range(C):
            a[c], b[c] = scale_shift(mode, s1[c], s2[c], n, g[c], bb[c], eps)
        flat = ok.reshape(-1, C)
        for p in range(flat.shape[0]):
            for c in range(C):
                flat[p, c] = relu(a[c] * flat[p, c] + b[c], zero)
