"""The engine's compiled CPU loops (:mod:`core.engine.kernels`) against PyTorch operators and layers.

Oracles: a batched matmul of the one-channel im2col plus BatchNorm → ReLU → 2×2 max on the rows
(:func:`core.engine.blocks.bn_relu_pool_rows`), and the layers themselves; every geometry the
block loop accepts, odd and even maps, each BatchNorm mode, output layout and dtype, and NaN and
−inf where the layers put them. Skipped without Numba.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.engine import kernels
from core.engine import windows as Wn
from core.engine.blocks import bn_relu_pool_rows


def _needs_numba():
    if kernels._compiled() is None:
        pytest.skip("Numba is not installed")


def _bn_in(mode, C, dtype):
    """A BatchNorm2d in train mode, eval mode (running statistics) or none (None)."""
    if mode == "none":
        return None
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(C).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn.train(mode == "train")


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", [7, 8])
@pytest.mark.parametrize("bn_mode", ["train", "eval", "no affine"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=0),
                                      dict(kernel_size=3, stride=2, padding=1),
                                      dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=(1, 9), padding=(0, 4)),
                                      dict(kernel_size=(9, 1), padding=(4, 0)),
                                      dict(kernel_size=3, stride=(1, 2), dilation=(2, 1), padding=2)],
                         ids=["same", "valid", "strided", "dilated", "1x9", "9x1", "mixed"])
def test_block_loop_equals_matmul_and_layers(dtype, side, bn_mode, channels_last, geometry):
    _needs_numba()
    g = torch.Generator().manual_seed(4)
    K, Cout, B, Cin = 5, 3, 2, 4
    conv = nn.Conv2d(1, Cout, **geometry)
    old = torch.randn(Cin, B, side, side, generator=g, dtype=dtype)
    ch = torch.tensor([3, 0, 3, 1, 2])
    delta = torch.randn(K, B, side, side, generator=g, dtype=dtype)
    W = torch.randn(K, Cout, 9, generator=g, dtype=dtype)
    Ho, Wo = Wn.conv_out_size(conv, side, side)
    N, P = B * Ho * Wo, B * (Ho // 2) * (Wo // 2)
    Y = torch.randn(Cout, N, generator=g, dtype=dtype) + 2.0
    bn = nn.BatchNorm2d(Cout, affine=False).to(dtype) if bn_mode == "no affine" else _bn_in(bn_mode, Cout, dtype)
    patches = Wn.window_patches(conv, B, side, side, delta.device)
    assert patches.square == (geometry in (dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=0)))
    out = kernels.block_pool(old[ch] + delta, old, ch, patches, W, Y, P, bn, channels_last)
    index = Wn.conv_gather_index(conv, B, side, side, True, delta.device)
    rows = torch.bmm(W, Wn.im2col_one_channel((old[ch] + delta) - old[ch], index, 9)) + Y   # [K, Cout, N]
    expected = bn_relu_pool_rows(bn, rows, None, P)                                    # [K, Cout, P]
    torch.testing.assert_close(out.transpose(1, 2) if channels_last else out, expected, **_tol(dtype))
    mean = kernels.block_pool(old[ch] + delta, old, ch, patches, W, Y, P, bn, channels_last, mean=True)
    torch.testing.assert_close(mean, expected.view(K, Cout, B, -1).mean(3), **_tol(dtype))   # [K, Cout, B]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bn_mode", ["train", "eval", "none"])
def test_rows_loop_equals_torch(dtype, bn_mode):
    _needs_numba()
    g = torch.Generator().manual_seed(5)
    C, N, P = 4, 2 * 7 * 7, 2 * 9
    Y, coef = torch.randn(C, N, generator=g, dtype=dtype), torch.randn(6, N, generator=g, dtype=dtype)
    ch, cidx = torch.tensor([3, 0, 3]), torch.tensor([5, 1, 0])
    h = torch.tensor([0.5, -2.0, 1e-3], dtype=dtype)
    bn = _bn_in(bn_mode, C, dtype)
    out = kernels.rows_pool(Y, ch, coef, cidx, h, P, bn)
    expected = bn_relu_pool_rows(bn, Y[ch] + h[:, None] * coef[cidx], ch, P)
    torch.testing.assert_close(out, expected, **_tol(dtype))


@pytest.mark.parametrize("bn_mode", ["train", "eval", "none"])
@pytest.mark.parametrize("where", ["window", "uncovered"])
def test_loops_let_nan_through(bn_mode, where):
    """A NaN in a perturbed row reaches the output wherever PyTorch's layers put one (the 2×2 maximum
    alone could pass over it); rows without one are untouched, and so is a row whose NaN only the
    BatchNorm statistics could read when there are none (the pooling drops that position)."""
    _needs_numba()
    g = torch.Generator().manual_seed(5)
    C, B, side = 4, 2, 7
    N, P = B * side * side, B * 9
    Y, coef = torch.randn(C, N, generator=g), torch.randn(6, N, generator=g)
    ch, cidx, h = torch.tensor([3, 0, 3]), torch.tensor([5, 1, 0]), torch.tensor([0.5, -2.0, 1e-3])
    Y[3, 2 * P + 1 if where == "window" else 4 * P + 1] = float("nan")    # a corner of window 1, or
    bn = _bn_in(bn_mode, C, torch.float32)                                 # a position none covers
    out = kernels.rows_pool(Y, ch, coef, cidx, h, P, bn)
    expected = bn_relu_pool_rows(bn, Y[ch] + h[:, None] * coef[cidx], ch, P)
    assert out[expected.isnan()].isnan().all()
    if where == "uncovered" and bn_mode != "train":                    # the pooling drops it: no NaN,
        torch.testing.assert_close(out, expected)                       # as through the layers
    else:
        assert out[[0, 2]].isnan().any()
    torch.testing.assert_close(out[1], expected[1])
    # the block loop: a NaN in the change of one perturbation
    conv = nn.Conv2d(1, C, 3, padding=1)
    new, W = torch.randn(2, B, side, side, generator=g), torch.randn(2, C, 9, generator=g)
    new[1, 0, 2, 2] = float("nan")
    old, ch = torch.randn(3, B, side, side, generator=g), torch.tensor([2, 0])
    patches = Wn.window_patches(conv, B, side, side, new.device)
    out = kernels.block_pool(new, old, ch, patches, W, Y[:, :N].nan_to_num(), P, bn if bn is not None else
                             _bn_in("eval", C, torch.float32), False)
    assert out[1].isnan().any() and not out[0].isnan().any()


@pytest.mark.parametrize("bn_mode", ["train", "eval", "no affine"])
@pytest.mark.parametrize("where", ["window", "uncovered"])
@pytest.mark.parametrize("layout", ["channel-major", "channels-last", "mean"])
def test_block_loop_puts_nans_where_the_layers_do(bn_mode, where, layout):
    """A NaN in the cached conv output, inside a window or at a position no window covers (odd side),
    in every output layout of the block loop: NaN wherever matmul + layers give one, the same values
    elsewhere. (A row whose pooling reads a NaN is NaN throughout, as its 2×2 maxima may pass over
    it: with running statistics that is more NaN than the layers give, never less; a NaN the
    pooling drops changes nothing then, as through the layers.)"""
    _needs_numba()
    g = torch.Generator().manual_seed(6)
    K, Cout, B, side = 3, 3, 2, 7
    conv = nn.Conv2d(1, Cout, 3, padding=1)
    N, P = B * side * side, B * 9
    old = torch.randn(2, B, side, side, generator=g)
    ch, new = torch.tensor([1, 0, 1]), torch.randn(K, B, side, side, generator=g)
    W, Y = torch.randn(K, Cout, 9, generator=g), torch.randn(Cout, N, generator=g)
    Y[2, P + 4 if where == "window" else 4 * P + 3] = float("nan")         # channel 2 only
    bn = nn.BatchNorm2d(Cout, affine=False) if bn_mode == "no affine" else _bn_in(bn_mode, Cout, torch.float32)
    patches = Wn.window_patches(conv, B, side, side, new.device)
    out = kernels.block_pool(new, old, ch, patches, W, Y, P, bn, layout == "channels-last", mean=layout == "mean")
    index = Wn.conv_gather_index(conv, B, side, side, True, new.device)
    rows = torch.bmm(W, Wn.im2col_one_channel(new - old[ch], index, 9)) + Y
    expected = bn_relu_pool_rows(bn, rows, None, P)                                   # [K, Cout, P]
    if layout == "mean":
        expected = expected.view(K, Cout, B, -1).mean(3)
    elif layout == "channels-last":
        out = out.transpose(1, 2)
    assert out[expected.isnan()].isnan().all() and not out[:, :2].isnan().any()   # other channels untouched
    dropped = bn_mode == "eval" and where == "uncovered"
    assert out[:, 2].isnan().all() != dropped
    if bn_mode != "eval" or dropped:                                  # batch statistics read every position
        assert torch.equal(out.isnan(), expected.isnan())
    both = ~(out.isnan() | expected.isnan())
    torch.testing.assert_close(out[both], expected[both], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn_mode", ["eval", "none"])
def test_loops_map_minus_infinity_like_the_layers(bn_mode):
    _needs_numba()
    g = torch.Generator().manual_seed(8)
    C, N, P = 4, 2 * 7 * 7, 2 * 9
    Y, coef = torch.randn(C, N, generator=g), torch.randn(6, N, generator=g)
    ch, cidx, h = torch.tensor([3, 0]), torch.tensor([5, 1]), torch.tensor([0.5, -2.0])
    Y[3, 5] = float("-inf")
    bn = _bn_in(bn_mode, C, torch.float32)
    out = kernels.rows_pool(Y, ch, coef, cidx, h, P, bn)
    torch.testing.assert_close(out, bn_relu_pool_rows(bn, Y[ch] + h[:, None] * coef[cidx], ch, P))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
@pytest.mark.parametrize("side", [7, 8])
def test_channels_last_loop_equals_layers(dtype, bn_mode, side):
    _needs_numba()
    g = torch.Generator().manual_seed(7)
    K, B, C = 3, 2, 5
    y = torch.randn(K, B, side, side, C, generator=g, dtype=dtype) + 1.0
    bn = _bn_in(bn_mode, C, dtype)
    out = kernels.channels_last_pool(y, bn)                                            # [K, B, h, w, C]
    with torch.no_grad():
        expected = torch.stack([F.max_pool2d(F.relu(bn(y[k].permute(0, 3, 1, 2))), 2) for k in range(K)])
    torch.testing.assert_close(out.permute(0, 1, 4, 2, 3), expected, **_tol(dtype))
    mean = kernels.channels_last_pool(y, bn, mean=True)                                # [K, B, C]: with the
    torch.testing.assert_close(mean, expected.mean((3, 4)), **_tol(dtype))           # global average pool

