"""The fast CGE engine on models users bring: exact where it can be, one loud fallback where not.

Oracle: the naive loop (one full forward per coordinate, ``engine="naive"``). Everything is float64
and deterministic, so the fast engine must agree to rounding (relative difference ≤ 1e-9); where
the engine refuses, ``engine="auto"`` warns once naming the layer and *is* the naive loop.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from core import CGE
from core.engine import EngineUnsupported, FastCGE
from tests.core import toy_models as M
from tests.core.devices import DEVICES


def _data(shape, *, classes=4, regression=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if regression:
        return x, torch.randn(*shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (shape[0],), generator=g)


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _naive(model, loss, x, y, **kw):
    """Gradient and buffers after one naive step, on a copy (the model itself is left untouched)."""
    ref = copy.deepcopy(model)
    zo = CGE(ref, engine="naive", **kw)
    loss0 = zo.backward(loss, x, y)
    return _grads(ref).clone(), loss0, _state(ref), zo.queries


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def dict_loss(out, y):
    return F.cross_entropy(out["logits"], y)


def tuple_loss(out, y):
    return F.cross_entropy(out[0], y)


# name: (model, input shape, loss, what the message must name)
UNSUPPORTED = {
    "dict output": (M.DictOut, (6, 12), dict_loss, "returns a dict"),
    "tuple output": (M.TupleOut, (6, 12), tuple_loss, "returns a tuple"),
    "GRU": (lambda: M.RecurrentNet("gru"), (6, 4, 3), F.cross_entropy,
            r"layer 'rnn' \(GRU\) returns a tuple"),
    "LSTM": (lambda: M.RecurrentNet("lstm"), (6, 4, 3), F.cross_entropy,
             r"layer 'rnn' \(LSTM\) returns a tuple"),
    "two inputs": (M.TwoInputs, (6, 12), F.cross_entropy, r"2 inputs \(x, scale\)"),
    "h += 1 read through an alias": (M.AliasedIadd, (6, 12), F.cross_entropy,
                                     r"another output than the model.*layer 'fc2' \(Linear\)"),
    "relu_ under a live view": (M.AliasedView, (6, 12), F.cross_entropy,
                                r"'relu_' \(Tensor.relu_\) overwrites 'fc1' in place while 'view'"),
    "in-place inside a BlackBox": (M.hidden_inplace_blackbox, (6, 12), F.cross_entropy,
                                   r"layer '1' \(BlackBox\) changes its input"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_model_warns_once_and_equals_naive(case):
    build, shape, loss, match = UNSUPPORTED[case]
    torch.manual_seed(0)
    model = build().double()
    x, y = _data(shape)
    ref, ref_loss, ref_state, ref_queries = _naive(model, loss, x, y)
    zo = CGE(model)
    with pytest.warns(RuntimeWarning, match=match) as record:
        loss0 = zo.backward(loss, x, y)
    assert len(record) == 1
    assert zo.last_engine == "naive"
    assert torch.equal(_grads(model), ref) and torch.equal(loss0, ref_loss)
    assert zo.queries == ref_queries
    for k, v in _state(model).items():        # BN stats moved exactly once, as in the naive step
        assert torch.equal(v, ref_state[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # warned once: the next steps are silent
        zo.backward(loss, x, y)


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_model_with_engine_fast_raises_and_changes_nothing(case):
    build, shape, loss, match = UNSUPPORTED[case]
    torch.manual_seed(0)
    model = build().double()
    x, y = _data(shape)
    before = _state(model)
    boxes = [m for m in model.modules() if hasattr(m, "queries")]
    with pytest.raises(ValueError, match=match):
        CGE(model, engine="fast").backward(loss, x, y)
    for k, v in _state(model).items():        # parameters and BN running stats as before the call
        assert torch.equal(v, before[k]), k
    assert all(m.queries == 0 for m in boxes)


# name: (model, input shape, train mode, bias coordinates read only by train-mode BatchNorm: exactly
# 0, not evaluated by the fast engine)
SUPPORTED = {
    "ReLU(inplace) after conv and BN": (M.InplaceReluCNN, (6, 1, 8, 8), True, 4),
    "ReLU(inplace), eval mode": (M.InplaceReluCNN, (6, 1, 8, 8), False, 0),
    "out += identity, F.relu(inplace)": (M.InplaceResBlock, (6, 1, 8, 8), True, 4),
    "add_ unassigned, relu_, leaky_relu(inplace)": (M.InplaceMethods, (6, 12), True, 0),
    "tied weights": (M.TiedLinear, (6, 12), True, 0),
    "BlackBox in the middle": (M.blackbox_middle, (6, 12), True, 0),
    "sigmoid gate a * b": (M.Gated, (6, 12), True, 0),
    "conv gate a * b": (M.GatedConv, (6, 1, 8, 8), True, 3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("central", [False, True], ids=["forward", "central"])
@pytest.mark.parametrize("case", list(SUPPORTED))
def test_supported_model_fast_equals_naive(case, central, device):
    build, shape, train, normalised = SUPPORTED[case]
    torch.manual_seed(0)
    model = build().double().to(device).train(train)
    x, y = (t.to(device) for t in _data(shape, classes=5 if len(shape) == 4 else 4))
    ref, ref_loss, ref_state, ref_queries = _naive(model, F.cross_entropy, x, y, central=central)
    zo = CGE(model, central=central)
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # supported: no fallback warning
        loss0 = zo.backward(F.cross_entropy, x, y)
    assert zo.last_engine == "fast"
    assert _rel(_grads(model), ref) <= 1e-9
    assert torch.allclose(loss0, ref_loss, rtol=1e-12)
    assert zo.queries == ref_queries - normalised * x.shape[0] * (2 if central else 1)
    for k, v in _state(model).items():
        assert torch.allclose(v, ref_state[k], rtol=1e-12), k
    if case == "BlackBox in the middle":      # only the layer before it perturbs what it sees
        upstream = sum(p.numel() for p in model[0].parameters())
        assert model[2].queries == x.shape[0] * (1 + upstream * (2 if central else 1))


def test_cached_values_survive_in_place_layers_across_steps():
    """Two steps on the same engine give the same gradient: nothing in the cache was overwritten."""
    torch.manual_seed(0)
    model = M.InplaceResBlock().double()
    x, y = _data((6, 1, 8, 8), classes=5)
    zo = CGE(model, engine="fast")
    zo.backward(F.cross_entropy, x, y)
    first = _grads(model).clone()
    zo.backward(F.cross_entropy, x, y)
    assert torch.allclose(_grads(model), first, rtol=1e-12, atol=1e-15)


def _spy_generic(monkeypatch):
    """Record the nodes the engine runs through its per-perturbation loop."""
    seen = []
    original = FastCGE._generic

    def spy(self, node, *args, **kwargs):
        seen.append(node.name)
        return original(self, node, *args, **kwargs)

    monkeypatch.setattr(FastCGE, "_generic", spy)
    return seen


@pytest.mark.parametrize("op", ["operator", "torch.sub", "method", "reversed"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dncnn_residual_is_exact_and_never_loops(op, train, monkeypatch):
    """DnCNN's ``x − body(x)`` against an MSE target: closed forms all the way (no ``_generic``)."""
    torch.manual_seed(0)
    model = M.TinyDnCNN(op=op).double().train(train)
    x, target = _data((4, 1, 6, 6), regression=True)
    ref, *_ = _naive(model, F.mse_loss, x, target)
    seen = _spy_generic(monkeypatch)
    zo = CGE(model, engine="fast")
    zo.backward(F.mse_loss, x, target)
    assert _rel(_grads(model), ref) <= 1e-9
    assert seen == [], f"per-perturbation loop ran for {sorted(set(seen))}"


@pytest.mark.parametrize("build", [M.Gated, M.GatedConv], ids=["linear gate", "conv gate"])
def test_gate_products_never_loop(build, monkeypatch):
    torch.manual_seed(0)
    model = build().double()
    x, y = _data((6, 12) if build is M.Gated else (6, 1, 8, 8), classes=4)
    ref, *_ = _naive(model, F.cross_entropy, x, y)
    seen = _spy_generic(monkeypatch)
    CGE(model, engine="fast").backward(F.cross_entropy, x, y)
    assert _rel(_grads(model), ref) <= 1e-9
    assert seen == [], f"per-perturbation loop ran for {sorted(set(seen))}"


def test_train_eval_switch_retraces_python_branches():
    """``if self.training:`` is frozen into a traced graph: switching mode must not reuse it."""
    torch.manual_seed(0)
    model = M.TrainOnlyBranch().double()
    x, y = _data((6, 12))
    zo = CGE(model, engine="fast")
    for train in (True, False, True):
        model.train(train)
        ref, *_ = _naive(model, F.cross_entropy, x, y)
        zo.backward(F.cross_entropy, x, y)
        assert zo.last_engine == "fast"
        assert _rel(_grads(model), ref) <= 1e-9, f"train={train}"


@pytest.mark.parametrize("method", ["fill_", "copy_"])
def test_in_place_method_without_out_of_place_form_is_refused_at_construction(method):
    class Filler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            getattr(h, method)(h.detach() * 0 + 1) if method == "copy_" else h.fill_(1.0)
            return h

    model = Filler()
    with pytest.raises(EngineUnsupported, match=rf"Tensor.{method}"):
        FastCGE(model, list(model.named_parameters()))
