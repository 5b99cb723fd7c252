"""Exception safety: a step interrupted in the middle leaves every parameter and buffer bit-identical.

The interruption is a BlackBox whose query budget runs out part-way through the step (the model
is in train mode with BatchNorm, so the unperturbed forward has already moved running statistics
by then), or a KeyboardInterrupt raised from inside the objective.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import (CGE, RGE, BlackBox, BudgetExceeded, Hybrid, MeZO, batched_objective, stacked_forward)
from core.sparsity import zo_grasp_scores

B = 6


def _model(budget=None):
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(),
                          BlackBox(lambda h: h @ W.T, budget=budget, name="api"), nn.Linear(3, 3)).double()
    return model.train()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


def _saved(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, saved):
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v), f"{k} changed"


def _batched_ce(x, y):
    @batched_objective(queries=B)
    def ce(model, params):
        logits = stacked_forward(model, params, x)
        K = logits.shape[0]
        return F.cross_entropy(logits.reshape(K * B, -1), y.repeat(K), reduction="none").reshape(K, B).mean(1)
    return ce


# (estimator factory, objective kind): the budget allows the unperturbed loss and a few perturbations
CASES = {
    "CGE naive forward": (lambda m: CGE(m, engine="naive"), "supervised"),
    "CGE naive central": (lambda m: CGE(m, engine="naive", central=True), "supervised"),
    "CGE auto forward": (lambda m: CGE(m, chunk=2), "supervised"),
    "CGE fast central": (lambda m: CGE(m, engine="fast", central=True, chunk=2), "supervised"),
    "CGE general": (lambda m: CGE(m), "general"),
    "CGE batched": (lambda m: CGE(m, objective_batch=4), "batched"),
    "RGE": (lambda m: RGE(m, q=20, seed=0), "supervised"),
    "RGE antithetic general": (lambda m: RGE(m, q=20, antithetic=True, seed=0), "general"),
    "RGE batched": (lambda m: RGE(m, q=20, seed=0, objective_batch=4), "batched"),
    "MeZO": (lambda m: MeZO(m, q=10, seed=0), "supervised"),
    "MeZO batched": (lambda m: MeZO(m, q=10, seed=0, objective_batch=4), "batched"),
}


def _args(kind, x, y):
    if kind == "supervised":
        return (F.cross_entropy, x, y)
    if kind == "general":
        return (lambda m: F.cross_entropy(m(x), y),)
    return (_batched_ce(x, y),)


@pytest.mark.parametrize("name", list(CASES))
def test_budget_exhausted_mid_step_restores_parameters_and_buffers(name):
    make, kind = CASES[name]
    model = _model(budget=5 * B + 2)          # the 6th model evaluation of the step fails
    x, y = _data()
    zo = make(model)
    saved = _saved(model)
    with pytest.raises(BudgetExceeded, match="api"):
        zo.backward(*_args(kind, x, y))
    assert model[3].queries == 5 * B          # the budget check comes before the call
    _assert_unchanged(model, saved)


def test_mezo_estimate_is_covered_too():
    model = _model(budget=3 * B)
    x, y = _data()
    zo = MeZO(model, q=4, seed=0)
    saved = _saved(model)
    with pytest.raises(BudgetExceeded):
        zo.estimate(F.cross_entropy, x, y)
    _assert_unchanged(model, saved)
    assert zo.step_count == 0                 # the interrupted step did not happen


def test_hybrid_restores_the_fo_and_zo_parts():
    model = _model(budget=4 * B)
    x, y = _data()
    body = list(model[0].parameters()) + list(model[1].parameters())
    hy = Hybrid(model, zo=[CGE(model, params=body, engine="naive")], fo_params=model[4].parameters())
    saved = _saved(model)
    with pytest.raises(BudgetExceeded):
        hy.backward(F.cross_entropy, x, y)
    _assert_unchanged(model, saved)


def test_zo_grasp_restores_weights_and_buffers():
    model = _model(budget=7 * B)
    x, y = _data()
    saved = _saved(model)
    with pytest.raises(BudgetExceeded):
        zo_grasp_scores(model, F.cross_entropy, x, y, q=4, generator=torch.Generator().manual_seed(0))
    _assert_unchanged(model, saved)


@pytest.mark.parametrize("make", [lambda m: CGE(m), lambda m: CGE(m, central=True),
                                  lambda m: RGE(m, q=5, seed=0), lambda m: MeZO(m, q=5, seed=0)],
                         ids=["CGE", "CGE central", "RGE", "MeZO"])
def test_keyboard_interrupt_inside_the_objective_restores_everything(make):
    model = _model()
    x, y = _data()
    calls = []

    def interrupted(m):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return F.cross_entropy(m(x), y)

    zo = make(model)
    saved = _saved(model)
    with pytest.raises(KeyboardInterrupt):
        zo.backward(interrupted)
    _assert_unchanged(model, saved)


def test_an_interrupted_rge_step_retried_gives_the_uninterrupted_result():
    x, y = _data()
    model = _model()
    RGE(model, q=6, seed=3).backward(F.cross_entropy, x, y)
    expected = [p.grad.clone() for p in model.parameters()]
    model = _model(budget=3 * B)
    zo = RGE(model, q=6, seed=3)
    with pytest.raises(BudgetExceeded):
        zo.backward(F.cross_entropy, x, y)
    model[3].budget = None
    zo.backward(F.cross_entropy, x, y)
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(p.grad, g)
