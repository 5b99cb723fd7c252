"""The fast CGE engine's parts against PyTorch's own layers, and its fused paths against the naive loop.

Oracles: ``F.max_pool2d`` and ``F.unfold`` for the index maps (exact), the layers run one by one on
the perturbed input for the fused blocks (float64, rounding only), and the naive coordinate loop
for whole estimates (float64, relative difference ≤ 1e-10). The fused paths run twice, with the
compiled CPU loops (:mod:`core.engine.kernels`) and with PyTorch operators only.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core.engine.propagate as P
from core import CGE
from core.engine import FastCGE, kernels
from core.engine import windows as Wn
from core.engine.blocks import chan_through_block, full_through_block
from core.engine.graph import Op
from tests.core.devices import DEVICES
from tests.core.test_engine_loops import _needs_numba


@pytest.fixture(params=["loops", "torch ops"])
def loops(request, monkeypatch):
    """Run a test with the compiled CPU loops (skipped without Numba) and with PyTorch operators only."""
    if request.param == "loops" and kernels._compiled() is None:
        pytest.skip("Numba is not installed")
    monkeypatch.setattr(kernels, "use", request.param == "loops")
    return request.param == "loops"


def _cnn(depth=3, width=4, classes=5):
    """DeepZero's CNN: ``depth`` × [conv 3×3 → BN → ReLU → maxpool 2], global average pool, Linear."""
    layers, c = [], 1
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def _data(B=4, side=14, classes=5, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, side, side, generator=g, dtype=torch.float64)
    return x.to(device), torch.randint(0, classes, (B,), generator=g).to(device)


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _rel_to_naive(model, x, y, **kw):
    ref = copy.deepcopy(model)
    CGE(ref, engine="naive", **kw).backward(F.cross_entropy, x, y)
    zo = CGE(model, engine="fast", **kw)
    zo.backward(F.cross_entropy, x, y)
    return float((_grads(model) - _grads(ref)).norm() / _grads(ref).norm())


# -- index maps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 7, 7), (1, 5, 8), (3, 3, 2)])
def test_window_order_pools_like_max_pool2d(shape):
    B, H, W = shape
    x = torch.randn(B, H, W, dtype=torch.float64)
    order = Wn.window_order(B, H, W, x.device)
    assert torch.equal(order.sort().values, torch.arange(B * H * W))          # a permutation
    pooled = Wn.pool_windows(x.reshape(-1)[order], B * (H // 2) * (W // 2))
    assert torch.equal(pooled, F.max_pool2d(x.unsqueeze(1), 2).reshape(-1))


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=2, stride=2),
                                      dict(kernel_size=3, padding=2, dilation=2),
                                      dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))])
@pytest.mark.parametrize("windowed", [False, True], ids=["natural", "window-major"])
def test_gather_index_is_one_channel_im2col(geometry, windowed):
    conv = nn.Conv2d(1, 1, **geometry)
    K, B, H, W = 3, 2, 7, 6
    delta = torch.randn(K, B, H, W, dtype=torch.float64)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    U = Wn.im2col_one_channel(delta.reshape(K, -1), Wn.conv_gather_index(conv, B, H, W, windowed, delta.device), taps)
    ref = F.unfold(delta.reshape(K * B, 1, H, W), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    ref = ref.reshape(K, B, taps, -1).transpose(1, 2).reshape(K, taps, -1)    # [K, taps, B·L]
    if windowed:
        Ho, Wo = Wn.conv_out_size(conv, H, W)
        ref = ref[:, :, Wn.window_order(B, Ho, Wo, delta.device)]
    assert torch.equal(U, ref)


# -- fused blocks against the layers run one by one -------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("side", [7, 8])
@pytest.mark.parametrize("layout", ["channel-major", "channels-last"])
def test_fused_block_equals_its_layers(side, train, device, loops, layout):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1).double().to(device), nn.BatchNorm2d(5).double().to(device)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.train(train)

    def layers(x):                                              # the block as PyTorch runs it
        return F.max_pool2d(F.relu(bn(conv(x))), 2)

    B = 4
    x = torch.randn(B, 3, side, side, dtype=torch.float64, device=device)
    with torch.no_grad():
        y = conv(x)
        ch, K = torch.tensor([2, 0], device=device), 2
        delta = torch.randn(K, B, side, side, dtype=torch.float64, device=device)
        xs = x.unsqueeze(0).repeat(K, 1, 1, 1, 1)              # [K, B, C, H, W]
        xs[torch.arange(K), :, ch] += delta
        expected = torch.stack([layers(xs[k]) for k in range(K)]).transpose(1, 2)   # [K, C, B, h, w]
        order = Wn.window_order(B, side, side, x.device)
        old = x.transpose(0, 1).contiguous()                   # [C, B, H, W]
        one = chan_through_block(bn, old[ch] + delta, old, ch, conv, conv.weight.transpose(0, 1).flatten(2).contiguous(),
                                 y.transpose(0, 1).reshape(5, -1)[:, order], (B, side, side),
                                 channels_last=layout == "channels-last")
        full = full_through_block(conv, bn, xs.transpose(1, 2).contiguous())
    torch.testing.assert_close(one.t, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full.t, expected, rtol=1e-12, atol=1e-12)


# -- whole estimates with the compiled loops ----------------------------------------------------------

def test_float32_estimate_with_loops_is_as_accurate_as_the_naive_loop(loops):
    """In float32 the loops' sums round differently from PyTorch's: the error to the float64 exact
    finite difference must stay of the naive float32 loop's size."""
    torch.manual_seed(0)
    model = _cnn(width=6)
    x, y = _data(B=8, side=16)
    x = x.float()
    exact = copy.deepcopy(model).double()
    CGE(exact, engine="naive").backward(F.cross_entropy, x.double(), y)
    naive, fast = copy.deepcopy(model), model
    CGE(naive, engine="naive").backward(F.cross_entropy, x, y)
    CGE(fast, engine="fast").backward(F.cross_entropy, x, y)
    g = _grads(exact)
    err_naive = float((_grads(naive).double() - g).norm() / g.norm())
    err_fast = float((_grads(fast).double() - g).norm() / g.norm())
    assert err_fast <= 2 * err_naive + 1e-6, (err_fast, err_naive)


# -- whole estimates -------------------------------------------------------------------------------
def _spy_fused(monkeypatch):
    calls = {"chan": 0, "full": 0, "loop": 0}

    def count(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return spy

    monkeypatch.setattr(P, "chan_through_block", count("chan", P.chan_through_block))
    monkeypatch.setattr(P, "full_through_block", count("full", P.full_through_block))
    monkeypatch.setattr(kernels, "block_pool", count("loop", kernels.block_pool))
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("central", [False, True], ids=["forward", "central"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_paper_cnn_on_odd_maps_is_exact_and_fused(train, central, device, monkeypatch, loops):
    """14×14 inputs: 14 → 7 → 3 → 1, so two of the three blocks pool maps with a leftover row."""
    torch.manual_seed(0)
    model = _cnn().double().to(device).train(train)
    x, y = _data(device=device)
    calls = _spy_fused(monkeypatch)
    assert _rel_to_naive(model, x, y, central=central) <= 1e-10
    assert calls["chan"] > 0 and calls["full"] > 0                 # the fused passes did the work
    assert (calls["loop"] > 0) == (loops and device == "cpu")        # ... in the compiled loops on a CPU


class _BrokenNumba:
    """Stands in for core.engine._loops when Numba fails at import (e.g. no writable cache folder)."""

    def __getattr__(self, name):
        raise RuntimeError("cannot cache function 'block9': no locator available")


def test_a_numba_that_fails_at_import_falls_back_with_one_warning(monkeypatch):
    import sys

    import core.engine

    monkeypatch.setitem(sys.modules, "core.engine._loops", _BrokenNumba())
    monkeypatch.setattr(core.engine, "_loops", _BrokenNumba(), raising=False)   # if imported already
    kernels._compiled.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CPU loops are unavailable.*no locator"):
            assert not kernels.enabled(torch.zeros(1))
        assert not kernels.enabled(torch.zeros(1))                   # decided once: no second warning
        torch.manual_seed(0)
        model = _cnn().double()
        x, y = _data()
        assert _rel_to_naive(model, x, y) <= 1e-10                    # exact through the PyTorch path
    finally:
        kernels._compiled.cache_clear()


def test_flop_counter_sees_the_work_the_loops_would_hide(monkeypatch):
    """Under FlopCounterMode (edge KD counts training FLOPs with it) the engine runs PyTorch operators."""
    from torch.utils.flop_counter import FlopCounterMode

    _needs_numba()
    torch.manual_seed(0)
    model = _cnn().double()
    x, y = _data()

    def counted():
        with FlopCounterMode(display=False) as counter:
            CGE(model, engine="fast").backward(F.cross_entropy, x, y)
        return counter.get_total_flops()

    with_loops = counted()
    monkeypatch.setattr(kernels, "use", False)
    assert with_loops == counted() > 0


def test_many_small_chunks_equal_the_naive_loop(loops):
    """Chunks of 3 reuse each block's output buffer many times within one step."""
    torch.manual_seed(0)
    model = _cnn().double()
    x, y = _data()
    assert _rel_to_naive(model, x, y, chunk=3) <= 1e-10


@pytest.mark.parametrize("variant", ["negative gamma", "strided conv without bias", "BN without affine"])
def test_block_variants_stay_exact(variant, loops):
    torch.manual_seed(0)
    model = _cnn().double()
    if variant == "negative gamma":                                # BN → ReLU no longer commutes with max
        with torch.no_grad():
            model[1].weight[0] = -0.5
            model[5].weight[1] = -1.5
    elif variant == "strided conv without bias":
        model[4] = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False).double()
    else:
        model[5] = nn.BatchNorm2d(4, affine=False).double()
    x, y = _data(side=16 if variant == "strided conv without bias" else 14)
    assert _rel_to_naive(model, x, y) <= 1e-10


def test_active_subsets_add_up_to_the_full_estimate():
    """Distributed ranks pass disjoint subsets of the coordinates: each gets exactly its share."""
    torch.manual_seed(0)
    model = _cnn().double()
    x, y = _data()
    named = list(model.named_parameters())
    engine = FastCGE(model, named)
    everything = [torch.arange(p.numel()) for _, p in named]
    g = torch.Generator().manual_seed(2)
    halves = [torch.randperm(p.numel(), generator=g) for _, p in named]
    first = [h[: len(h) // 2].sort().values for h in halves]
    second = [h[len(h) // 2:].sort().values for h in halves]
    with torch.no_grad():
        loss, full, evals = engine.estimate(F.cross_entropy, x, y, 5e-3, False, everything, lambda: None)
        _, a, evals_a = engine.estimate(F.cross_entropy, x, y, 5e-3, False, first, lambda: None)
        _, b, evals_b = engine.estimate(F.cross_entropy, x, y, 5e-3, False, second, lambda: None)
    for ga, gb, idx_a, idx_b in zip(a, b, first, second):
        assert torch.all(ga[idx_b] == 0) and torch.all(gb[idx_a] == 0)
    parts, whole = torch.cat(a) + torch.cat(b), torch.cat(full)
    assert (parts - whole).norm() <= 1e-10 * whole.norm()             # chunks differ: rounding only
    normalised = 3 * 4                 # the conv biases BatchNorm removes: exactly 0, never evaluated
    assert evals_a + evals_b == evals == (sum(p.numel() for _, p in named) - normalised) * x.shape[0]


@pytest.mark.parametrize("chunk,central", [(None, False), (5, False), (6, True)])
def test_a_split_at_batch_boundaries_is_bit_for_bit_the_whole_estimate(chunk, central, loops):
    """What a distributed rank relies on (core.sharding.split with units): cut each parameter's
    active coordinates only after whole batches of the engine, and every part is the one-call value.
    (With PyTorch operators, as on a GPU, a cut anywhere else changed the last bits here: 5e-5 in
    float32 with the default batches.)"""
    from core.sharding import split
    from core.estimators.objectives import bind_objective

    torch.manual_seed(0)
    model = _cnn()                                                 # float32: no tolerance to hide behind
    x, y = _data()
    x = x.float()
    zo = CGE(model, chunk=chunk, central=central)
    call = bind_objective(F.cross_entropy, x, y)
    assert zo.cut_units(call) is None                              # no plan for this shape yet
    g = torch.Generator().manual_seed(5)
    active = [torch.randperm(p.numel(), generator=g)[: max(1, 2 * p.numel() // 3)].sort().values
              for p in model.parameters()]
    _, whole = zo._estimate(call, active)
    units = zo.cut_units(call)
    step = (chunk or 0) // 2 if central else chunk
    assert units is not None and (step is None or set(units) <= {1, step}), units
    parts = split(active, 3, [1.0] * len(active), units=units)
    cut = any(sum(1 for r in range(3) if parts[r][i].numel()) > 1 for i in range(len(active)))
    assert cut or chunk is None                                    # default batches hold these small layers whole
    total = [torch.zeros_like(w) for w in whole]
    for share in parts:
        _, got = zo._estimate(call, share)
        for t, gi in zip(total, got):
            t += gi                                                # disjoint: each value lands once
    assert all(torch.equal(a, b) for a, b in zip(total, whole))
    smaller = bind_objective(F.cross_entropy, x[:3], y[:3])       # another shape: not planned yet
    assert zo.cut_units(smaller) is None
    model.eval()                                                   # another mode: the engine traces again
    assert zo.cut_units(call) is None
    model.train()
    naive = CGE(model, engine="naive")
    assert naive.cut_units(call) == [1] * len(active)              # one coordinate at a time: any cut



@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_chunk_size_does_not_change_the_estimate(chunk):
    torch.manual_seed(0)
    model = _cnn(depth=2).double()
    x, y = _data(side=8)
    CGE(model).backward(F.cross_entropy, x, y)
    default = _grads(model).clone()
    CGE(model, chunk=chunk).backward(F.cross_entropy, x, y)
    assert (_grads(model) - default).norm() <= 1e-10 * default.norm()


def test_plan_classifies_nodes_and_finds_the_blocks():
    model = _cnn()
    engine = FastCGE(model, list(model.named_parameters()))
    assert all(isinstance(op, Op) for op in engine.ops.values())
    assert [engine.ops[n] for n in engine.nodes][:2] == [Op.INPUT, Op.MODULE]
    assert [n.target for n in engine.blocks] == ["0", "4", "8"]       # conv → BN → ReLU → pool, three times
    assert [b.chain.pool.target for b in engine.blocks.values()] == ["3", "7", "11"]
    assert set(engine.chains) == {b.chain.bn for b in engine.blocks.values()}
