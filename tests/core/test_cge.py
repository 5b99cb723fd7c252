import functools

import pytest
import torch
import torch.nn.functional as F

from core import CGE, SparsityPlan, random_ratios
from tests.core.devices import DEVICES
from tests.core.toy_models import Odd, ResBlockNet, Untraceable, mlp, small_cnn


def _inputs(model_name, B=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    shapes = {"cnn": (B, 1, 8, 8), "mlp": (B, 12), "res": (B, 1, 8, 8), "odd": (B, 10), "untraceable": (B, 6)}
    classes = {"cnn": 5, "mlp": 4, "res": 3, "odd": 3, "untraceable": 3}
    x = torch.randn(*shapes[model_name], generator=g, dtype=dtype)
    y = torch.randint(0, classes[model_name], (B,), generator=g)
    return x, y


MODELS = {"cnn": small_cnn, "mlp": mlp, "res": ResBlockNet, "odd": Odd, "untraceable": Untraceable}
# bias coordinates read only by train-mode BatchNorm (cnn: both convs' 6; mlp: the first Linear's 8;
# res: conv1's and conv2's 4): their difference is exactly 0, and the fast engine does not evaluate them
NORMALISED_BIASES = {"cnn": 12, "mlp": 8, "res": 8, "odd": 0, "untraceable": 0}


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _autograd(model, x, y):
    model.zero_grad()
    saved = [b.clone() for b in model.buffers()]
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    return _grads(model).clone()


@pytest.mark.parametrize("name", ["cnn", "mlp", "res"])
def test_central_cge_matches_autograd(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y = _inputs(name)
    true = _autograd(model, x, y)
    zo = CGE(model, mu=1e-6, central=True)
    zo.backward(F.cross_entropy, x, y)
    est = _grads(model)
    assert F.cosine_similarity(est, true, dim=0) >= 0.9999
    assert (est - true).abs().max() <= 1e-3 * true.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["cnn", "mlp", "res", "odd", "untraceable"])
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("train_mode", [True, False])
def test_fast_engine_equals_naive_loop(name, central, train_mode, device):
    torch.manual_seed(0)
    model = MODELS[name]().double().to(device).train(train_mode)
    x, y = (t.to(device) for t in _inputs(name))
    fast = CGE(model, mu=5e-3, central=central)
    loss_fast = fast.backward(F.cross_entropy, x, y)
    g_fast = _grads(model).clone()
    buffers_after_fast = [b.clone() for b in model.buffers()]
    naive = CGE(model, mu=5e-3, central=central, engine="naive")
    loss_naive = naive.backward(F.cross_entropy, x, y)
    g_naive = _grads(model)
    expected_engine = "naive" if name == "untraceable" else "fast"
    assert fast.last_engine == expected_engine
    assert torch.allclose(loss_fast, loss_naive, rtol=1e-12)
    rel = (g_fast - g_naive).norm() / g_naive.norm()
    assert rel <= 1e-8, f"relative difference {rel:.2e}"
    skipped = NORMALISED_BIASES[name] if train_mode and expected_engine == "fast" else 0
    assert fast.queries == naive.queries - skipped * x.shape[0] * (2 if central else 1)
    # perturbed evaluations never move BN running stats: only the unperturbed forward does
    if not train_mode:
        for a, b in zip(buffers_after_fast, model.buffers()):
            assert torch.equal(a, b)


def test_fast_engine_sparse_equals_naive_and_zero_outside_mask():
    torch.manual_seed(0)
    model = small_cnn().double()
    x, y = _inputs("cnn")
    plan = SparsityPlan(model, random_ratios(model, 0.8), seed=3)
    fast = CGE(model, sparsity=plan)
    fast.backward(F.cross_entropy, x, y)
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    CGE(model, sparsity=plan, engine="naive").backward(F.cross_entropy, x, y)
    for n, p in model.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, rtol=1e-8, atol=1e-12), n
        if n in plan.masks():
            assert torch.all(g_fast[n][~plan.masks()[n]] == 0)
    assert fast.queries == (fast.num_active() + 1 - NORMALISED_BIASES["cnn"]) * x.shape[0]


class _BNAndSkip(torch.nn.Module):
    """A conv whose output BatchNorm reads and a skip adds back: its bias is not normalised away."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(3, 5)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((self.bn(h) + h).relu().mean((2, 3)))


@pytest.mark.parametrize("central", [False, True])
def test_bias_read_only_by_train_mode_batchnorm_is_exactly_zero_and_not_evaluated(central):
    torch.manual_seed(0)
    model = small_cnn().double()
    x, y = _inputs("cnn")
    biases = [model[0].bias, model[4].bias]
    true = _autograd(model, x, y)
    assert all(p.grad.abs().max() <= 1e-12 * true.abs().max() for p in biases)   # autograd: 0 up to rounding
    naive = CGE(model, central=central, engine="naive")
    naive.backward(F.cross_entropy, x, y)
    g_naive = _grads(model).clone()
    noise = [p.grad.abs().max() for p in biases]
    fast = CGE(model, central=central)
    fast.backward(F.cross_entropy, x, y)
    assert fast.last_engine == "fast"
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in biases)
    assert all(n <= 1e-10 for n in noise)              # the naive loop's value there is rounding noise
    assert (_grads(model) - g_naive).norm() <= 1e-8 * g_naive.norm()
    assert fast.queries == naive.queries - 12 * x.shape[0] * (2 if central else 1)

    model.eval()                                       # running statistics: the bias matters
    CGE(model, central=central, engine="naive").backward(F.cross_entropy, x, y)
    g_naive = _grads(model).clone()
    fast = CGE(model, central=central)
    fast.backward(F.cross_entropy, x, y)
    assert all(p.grad.abs().min() > 1e-6 for p in biases)
    assert (_grads(model) - g_naive).norm() <= 1e-8 * g_naive.norm()

    other = _BNAndSkip().double()                      # BatchNorm is not the bias's only reader
    CGE(other, central=central, engine="naive").backward(F.cross_entropy, x, y)
    g_naive = _grads(other).clone()
    fast = CGE(other, central=central)
    fast.backward(F.cross_entropy, x, y)
    assert fast.last_engine == "fast"
    assert other.conv.bias.grad.abs().min() > 1e-6
    assert (_grads(other) - g_naive).norm() <= 1e-8 * g_naive.norm()


def test_normalised_away_bias_follows_a_nan_loss():
    torch.manual_seed(0)
    model = small_cnn().double()
    x, y = _inputs("cnn")
    x[0, 0, 2, 2] = float("nan")
    zo = CGE(model)
    zo.backward(F.cross_entropy, x, y)
    assert zo.last_engine == "fast"
    assert model[0].bias.grad.isnan().all()             # as the naive loop: no number from a NaN loss


def test_small_chunks_give_same_answer():
    torch.manual_seed(0)
    model = ResBlockNet().double()
    x, y = _inputs("res")
    CGE(model, chunk=3).backward(F.cross_entropy, x, y)
    a = _grads(model).clone()
    CGE(model, chunk=64).backward(F.cross_entropy, x, y)
    assert torch.allclose(a, _grads(model), rtol=1e-9, atol=1e-11)


def test_general_and_batched_objectives_match_supervised():
    torch.manual_seed(0)
    model = mlp().double().eval()
    x, y = _inputs("mlp")
    CGE(model, engine="naive").backward(F.cross_entropy, x, y)
    ref = _grads(model).clone()
    zo = CGE(model)
    zo.backward(lambda m: F.cross_entropy(m(x), y))
    assert torch.allclose(_grads(model), ref, rtol=1e-10)

    from core import batched_objective

    @batched_objective
    def objective(m, params):
        call = lambda p: F.cross_entropy(torch.func.functional_call(m, p, (x,)), y)
        return torch.vmap(call)(params)

    zo = CGE(model, chunk=7)
    zo.backward(objective)
    assert zo.last_engine == "batched"
    assert torch.allclose(_grads(model), ref, rtol=1e-8)


def test_frozen_parameters_get_no_gradient():
    model = mlp().double()
    model[1].weight.requires_grad_(False)
    x, y = _inputs("mlp")
    CGE(model).backward(F.cross_entropy, x, y)
    assert model[1].weight.grad is None
    assert model[1].bias.grad is not None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mu"):
        CGE(mlp(), mu=0)
    with pytest.raises(ValueError, match="engine"):
        CGE(mlp(), engine="turbo")
    with pytest.raises(ValueError, match="cannot analyse"):
        CGE(Untraceable(), engine="fast").backward(F.cross_entropy, *_inputs("untraceable", dtype=torch.float32))


# -- losses: the closed-form cross-entropy only for exactly what it reproduces ------------------------
class _DoubledCE(torch.nn.CrossEntropyLoss):
    def forward(self, out, y):
        return 2 * super().forward(out, y)


def _branchy_loss(out, y):
    """Python control flow on a value: torch.vmap cannot batch it, the loop must."""
    ce = F.cross_entropy(out, y)
    return ce if float(ce) > 0 else -ce


LOSSES = {
    "F.cross_entropy": (F.cross_entropy, "cross_entropy"),
    "CrossEntropyLoss()": (torch.nn.CrossEntropyLoss(), "cross_entropy"),
    "weight": (torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25],
                                                             dtype=torch.float64)), "vmap"),
    "ignore_index": (torch.nn.CrossEntropyLoss(ignore_index=1), None),
    "label_smoothing": (torch.nn.CrossEntropyLoss(label_smoothing=0.1), "vmap"),
    "reduction=sum": (torch.nn.CrossEntropyLoss(reduction="sum"), "vmap"),
    "partial(label_smoothing)": (functools.partial(F.cross_entropy, label_smoothing=0.1), "vmap"),
    "partial(ignore_index)": (functools.partial(F.cross_entropy, ignore_index=3), None),
    "subclass": (_DoubledCE(), "vmap"),
    "lambda": (lambda out, y: F.cross_entropy(out, y) + 0.1 * out.square().mean(), "vmap"),
    "control flow (no vmap)": (_branchy_loss, "loop"),
}


@pytest.mark.parametrize("central", [False, True], ids=["forward", "central"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_option_equals_naive_loop(name, central):
    loss_fn, path = LOSSES[name]
    torch.manual_seed(0)
    model = small_cnn().double()
    x, y = _inputs("cnn")
    y[::2] = torch.tensor([1, 3, 1])           # labels equal to the ignore_index of the cases above
    zo = CGE(model, central=central)
    loss_fast = zo.backward(loss_fn, x, y)
    g_fast = _grads(model).clone()
    loss_naive = CGE(model, central=central, engine="naive").backward(loss_fn, x, y)
    assert zo.last_engine == "fast"
    assert torch.allclose(loss_fast, loss_naive, rtol=1e-12)
    rel = (g_fast - _grads(model)).norm() / _grads(model).norm()
    assert rel <= 1e-9, f"relative difference {rel:.2e}"
    if path is not None:                       # ignore_index: vmap or loop, whichever agrees
        assert zo._fast.losses.path == path
    else:
        assert zo._fast.losses.path in ("vmap", "loop")


def test_wrong_vmap_result_is_caught_on_first_use(monkeypatch):
    """If vmap silently computes something else than the loop, the engine keeps the loop."""
    real_vmap = torch.vmap

    def off_by_one_vmap(fn, *args, **kwargs):
        batched = real_vmap(fn, *args, **kwargs)
        return lambda *a: batched(*a) + 1.0

    monkeypatch.setattr(torch, "vmap", off_by_one_vmap)
    torch.manual_seed(0)
    model = mlp().double()
    x, y = _inputs("mlp")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.2)
    zo = CGE(model, chunk=5)
    zo.backward(loss_fn, x, y)
    assert zo._fast.losses.path == "loop"
    g_fast = _grads(model).clone()
    CGE(model, engine="naive").backward(loss_fn, x, y)
    assert torch.allclose(g_fast, _grads(model), rtol=1e-9, atol=1e-13)


def test_a_bug_in_the_loss_is_not_swallowed():
    """A loss that fails on perturbed outputs raises (vmap's error is not the end of the story)."""
    torch.manual_seed(0)
    model = mlp().double()
    x, y = _inputs("mlp")
    first = {}

    def loss_fn(out, y):
        first.setdefault("out", out.clone())
        if not torch.equal(out, first["out"]):
            raise KeyError("perturbed output")   # not an error vmap raises: must propagate
        return F.cross_entropy(out, y)

    with pytest.raises(KeyError, match="perturbed output"):
        CGE(model).backward(loss_fn, x, y)
