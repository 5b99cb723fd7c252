import pytest
import torch
import torch.nn.functional as F

from core import CGE, SparsityPlan, random_ratios
from tests.core.models import Odd, ResBlockNet, Untraceable, mlp, small_cnn


def _inputs(model_name, B=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    shapes = {"cnn": (B, 1, 8, 8), "mlp": (B, 12), "res": (B, 1, 8, 8), "odd": (B, 10), "untraceable": (B, 6)}
    classes = {"cnn": 5, "mlp": 4, "res": 3, "odd": 3, "untraceable": 3}
    x = torch.randn(*shapes[model_name], generator=g, dtype=dtype)
    y = torch.randint(0, classes[model_name], (B,), generator=g)
    return x, y


MODELS = {"cnn": small_cnn, "mlp": mlp, "res": ResBlockNet, "odd": Odd, "untraceable": Untraceable}


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


@pytest.mark.parametrize("name", ["cnn", "mlp", "res", "odd", "untraceable"])
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("train_mode", [True, False])
def test_fast_engine_equals_naive_loop(name, central, train_mode):
    torch.manual_seed(0)
    model = MODELS[name]().double().train(train_mode)
    x, y = _inputs(name)
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
    assert fast.queries == naive.queries
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
    assert fast.queries == (fast.num_active() + 1) * x.shape[0]


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
