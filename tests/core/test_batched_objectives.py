"""Batched objectives for every estimator, the stacked-parameter helpers, and honest query counts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import (CGE, RGE, BlackBox, MeZO, batched_objective, call_stacked, objective, stacked_forward)
from tests.core.toy_models import Untraceable, mlp

B = 6


def _data(d_in=12, classes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (B,), generator=g)


def _model(train=False):
    torch.manual_seed(0)
    return mlp().double().train(train)


def _ce_batched(x, y, sizes=None):
    """Cross-entropy of each parameter set; records the number of sets per call in ``sizes``."""
    @batched_objective(queries=x.shape[0])
    def ce(model, params):
        logits = stacked_forward(model, params, x)                                  # [K, B, C]
        K = logits.shape[0]
        if sizes is not None:
            sizes.append(K)
        return F.cross_entropy(logits.reshape(K * B, -1), y.repeat(K), reduction="none").reshape(K, B).mean(1)
    return ce


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# -- stacked evaluation ----------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-BN"])
@pytest.mark.parametrize("vmap", [None, False], ids=["vmap", "loop"])
def test_stacked_forward_equals_one_forward_per_set_and_leaves_the_model_alone(train, vmap):
    model = _model(train)
    x, _ = _data()
    K = 3
    params = {n: p.detach() + 0.1 * torch.randn(K, *p.shape, dtype=p.dtype)
              for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = stacked_forward(model, params, x, vmap=vmap)
    assert out.shape == (K, B, 4)
    for k in range(K):
        other = _model(train)
        other.load_state_dict(state)
        with torch.no_grad():
            for n, p in other.named_parameters():
                p.copy_(params[n][k])
            ref = other(x)
        assert torch.allclose(out[k], ref, rtol=1e-12, atol=1e-12)
    for k, v in model.state_dict().items():   # parameters untouched, no running-stat update
        assert torch.equal(state[k], v), k


def test_call_stacked_falls_back_to_a_loop_where_vmap_cannot_run():
    model = Untraceable().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    params = {"fc.weight": model.fc.weight.detach() + torch.randn(2, 3, 6, dtype=torch.float64)}

    def fn(m):                          # Python control flow on a value: vmap cannot batch it
        s = m(x).sum()
        return s if float(s) > 0 else -s

    with pytest.warns(RuntimeWarning, match="one by one"), torch.no_grad():
        out = call_stacked(model, params, fn)
    with torch.no_grad():
        ref = [F.linear(x if x.sum() > 0 else -x, params["fc.weight"][k], model.fc.bias).sum().abs()
               for k in range(2)]
    assert torch.allclose(out, torch.stack(ref))
    with pytest.raises(ValueError, match="no parameter"):
        call_stacked(model, {"fc.nope": params["fc.weight"]}, lambda m: m(x))
    with pytest.raises(ValueError, match="expected"):
        call_stacked(model, {"fc.weight": params["fc.weight"][:, :2]}, lambda m: m(x))


def test_a_blackbox_in_the_model_sees_real_batches_and_counts_every_set():
    W = torch.randn(3, 4, dtype=torch.float64)
    seen = []

    def api(h):
        seen.append(type(h) is torch.Tensor and h.shape[0])
        return h @ W.T

    bb = BlackBox(api)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), bb).double()
    x = torch.randn(B, 5, dtype=torch.float64)
    params = {n: p.detach().expand(3, *p.shape).clone() for n, p in model.named_parameters()}
    out = stacked_forward(model, params, x)
    assert out.shape == (3, B, 3) and seen == [B, B, B] and bb.queries == 3 * B


# -- batched objectives equal the general path ------------------------------------------------------
@pytest.mark.parametrize("central", [False, True], ids=["forward", "central"])
def test_cge_batched_equals_naive_and_counts_queries(central):
    model = _model()
    x, y = _data()
    ref = CGE(model, central=central, engine="naive")
    ref.backward(F.cross_entropy, x, y)
    g_ref = _grads(model).clone()
    sizes = []
    zo = CGE(model, central=central, objective_batch=50)
    loss = zo.backward(_ce_batched(x, y, sizes))
    d = zo.num_active()
    assert zo.last_engine == "batched"
    assert torch.allclose(loss, F.cross_entropy(model(x), y), rtol=1e-12)
    assert torch.allclose(_grads(model), g_ref, rtol=1e-7, atol=1e-10)
    rows = (2 * d + 1) if central else (d + 1)
    assert zo.queries == ref.queries == rows * B
    assert sum(sizes) == rows and max(sizes) <= 50 and len(sizes) == -(-rows // 50)


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_rge_batched_equals_general_path_with_base_in_row_zero(distribution, antithetic):
    model = _model()
    x, y = _data()
    q = 7
    ref = RGE(model, q=q, distribution=distribution, antithetic=antithetic, seed=4)
    loss_ref = ref.backward(F.cross_entropy, x, y)
    g_ref = _grads(model).clone()
    sizes = []
    zo = RGE(model, q=q, distribution=distribution, antithetic=antithetic, seed=4, objective_batch=4)
    loss = zo.backward(_ce_batched(x, y, sizes))
    assert torch.allclose(loss, loss_ref, rtol=1e-12)
    assert torch.allclose(_grads(model), g_ref, rtol=1e-6, atol=1e-9)
    rows = (2 * q + 1) if antithetic else (q + 1)
    assert zo.queries == ref.queries == rows * B
    # the unperturbed parameters ride in the first call: no call of their own
    assert sizes == ([3, 4, 4, 4] if antithetic else [4, 4])


def test_mezo_batched_equals_general_path():
    model = _model()
    x, y = _data()
    ref = MeZO(model, q=5, seed=2)
    loss_ref = ref.backward(F.cross_entropy, x, y)
    g_ref = _grads(model).clone()
    sizes = []
    zo = MeZO(model, q=5, seed=2, objective_batch=4)
    loss = zo.backward(_ce_batched(x, y, sizes))
    assert torch.allclose(loss, loss_ref, rtol=1e-12)
    assert torch.allclose(_grads(model), g_ref, rtol=1e-6, atol=1e-9)
    assert zo.queries == ref.queries == 2 * 5 * B
    assert sizes == [4, 4, 2]        # both signs of a direction in the same call


# -- objectives that ignore params, bad arguments --------------------------------------------------
@pytest.mark.parametrize("make", [lambda m: CGE(m), lambda m: RGE(m, q=4, seed=0),
                                  lambda m: MeZO(m, q=3, seed=0)], ids=["CGE", "RGE", "MeZO"])
def test_an_objective_that_ignores_params_is_an_error(make):
    model = _model()
    x, y = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    @batched_objective
    def wrong(model, params):          # evaluates the model's own parameters K times
        K = next(iter(params.values())).shape[0]
        return F.cross_entropy(model(x), y).expand(K)

    with pytest.raises(ValueError, match="must evaluate `params`"):
        make(model).backward(wrong)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_a_flat_objective_warns_and_gives_a_zero_gradient():
    model = _model()
    x, _ = _data()

    @batched_objective
    def flat(model, params):           # reads params, but does not depend on them
        return 0.0 * stacked_forward(model, params, x).sum((1, 2))

    zo = RGE(model, q=3, seed=0)
    with pytest.warns(RuntimeWarning, match="flat"):
        zo.backward(flat)
    assert torch.count_nonzero(_grads(model)) == 0


def test_bad_objective_arguments_raise_before_any_evaluation():
    model = _model()
    x, y = _data()
    zo = RGE(model, q=2, seed=0)
    with pytest.raises(ValueError, match="not\\s+to backward"):
        zo.backward(_ce_batched(x, y), x, y)
    with pytest.raises(ValueError, match="not\\s+to backward"):
        zo.backward(objective(lambda m: F.cross_entropy(m(x), y)), x, y)
    with pytest.raises(ValueError, match="y given without x"):
        zo.backward(F.cross_entropy, None, y)
    with pytest.raises(TypeError, match="callable"):
        zo.backward(None)
    with pytest.raises(ValueError, match="queries"):
        objective(queries=0)
    with pytest.raises(ValueError, match="objective_batch"):
        CGE(model, objective_batch=0)
    assert zo.queries == 0


# -- honest queries: every estimator, every kind of objective --------------------------------------
def _objectives(x, y, Q):
    supervised = (F.cross_entropy, x, y)
    general = (objective(lambda m: F.cross_entropy(m(x), y), queries=Q),)

    @batched_objective(queries=Q)
    def batched(model, params):
        logits = stacked_forward(model, params, x)
        K = logits.shape[0]
        return F.cross_entropy(logits.reshape(K * B, -1), y.repeat(K), reduction="none").reshape(K, B).mean(1)

    return {"supervised": supervised, "general": general, "batched": (batched,)}


@pytest.mark.parametrize("kind", ["supervised", "general", "batched"])
def test_query_counts_follow_the_formulas(kind):
    Q = 5 * B          # e.g. a rollout of 5 steps of a batch of B
    x, y = _data()
    per_eval = B if kind == "supervised" else Q
    model = nn.Sequential(nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 4)).double()   # no BN: MeZO costs 2q
    args = _objectives(x, y, Q)[kind]
    d = sum(p.numel() for p in model.parameters())
    cases = [(CGE(model), (d + 1)), (CGE(model, central=True), (2 * d + 1)),
             (CGE(model, engine="naive"), (d + 1)), (RGE(model, q=9, seed=0), 9 + 1),
             (RGE(model, q=9, antithetic=True, seed=0), 2 * 9 + 1), (MeZO(model, q=4, seed=0), 2 * 4)]
    for zo, evaluations in cases:
        zo.backward(*args)
        assert zo.queries == evaluations * per_eval, (type(zo).__name__, zo.queries, evaluations * per_eval)


def test_plain_general_objective_costs_one_query_per_evaluation():
    model = nn.Sequential(nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 4)).double()
    x, y = _data()
    zo = RGE(model, q=3, seed=0)
    zo.backward(lambda m: F.cross_entropy(m(x), y))
    assert zo.queries == 3 + 1


def test_declared_objectives_work_as_decorators_and_methods():
    x, y = _data()

    class Task:
        scale = 2.0

        @objective(queries=7)
        def loss(self, model):
            return self.scale * F.cross_entropy(model(x), y)

    task = Task()
    model = _model()
    assert task.loss.queries == 7
    assert torch.allclose(task.loss(model), 2.0 * F.cross_entropy(model(x), y))

    @batched_objective
    def bare(model, params):
        return stacked_forward(model, params, x).sum((1, 2))

    assert bare.queries == 1 and bare.__name__ == "bare"
    zo = MeZO(model, q=2, seed=0)
    zo.backward(task.loss)
    assert zo.queries == 2 * 2 * 7
