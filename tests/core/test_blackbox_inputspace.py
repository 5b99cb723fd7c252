import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import CGE, BlackBox, BudgetExceeded, Hybrid, NotDifferentiable, input_space_backward
from tests.core.devices import DEVICES


def test_blackbox_backward_raises_and_counts_queries():
    bb = BlackBox(lambda z: z * 2, name="api")
    x = torch.randn(5, 3, requires_grad=True)
    out = bb(x)
    assert torch.equal(out, x.detach() * 2)
    assert bb.queries == 5
    with pytest.raises(NotDifferentiable, match="api"):
        out.sum().backward()


def test_blackbox_budget_stops_at_exact_count():
    bb = BlackBox(torch.tanh, budget=10)
    bb(torch.zeros(4, 2)); bb(torch.zeros(6, 2))
    assert bb.queries == 10 and bb.remaining == 0
    with pytest.raises(BudgetExceeded, match="10 of 10"):
        bb(torch.zeros(1, 2))
    assert bb.queries == 10


def test_cge_through_a_model_ending_in_a_blackbox_counts_queries():
    torch.manual_seed(0)
    frozen = nn.Linear(4, 3).double()
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), BlackBox(frozen)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    zo = CGE(model, params=model[0].parameters(), central=True, mu=1e-6)
    zo.backward(F.cross_entropy, x, y)
    est = model[0].weight.grad.clone()
    ref = nn.Sequential(model[0], model[1], frozen)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    assert torch.allclose(est, model[0].weight.grad, rtol=1e-5, atol=1e-9)
    assert model[2].queries == zo.queries


@pytest.mark.parametrize("method", ["cge", "rge"])
def test_input_space_chain_rule_matches_autograd(method):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 4), nn.Tanh()).double()
    head = nn.Linear(4, 3).double()            # plays the black box; autograd gives the oracle
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    F.cross_entropy(head(encoder(x)), y).backward()
    true = encoder[0].weight.grad.clone()
    encoder.zero_grad()
    bb = BlackBox(head)
    loss = input_space_backward(lambda z: F.cross_entropy(bb(z), y.repeat(z.shape[0] // 8), reduction="none"),
                                encoder(x), method=method, mu=1e-6 if method == "cge" else 1e-5, q=4000,
                                central=True, generator=torch.Generator().manual_seed(0))
    est = encoder[0].weight.grad
    cos = F.cosine_similarity(est.reshape(-1), true.reshape(-1), dim=0)
    assert cos > (0.9999 if method == "cge" else 0.95)
    assert torch.isclose(loss, F.cross_entropy(head(encoder(x)), y))
    assert bb.queries == ((2 * 4 + 1) * 8 if method == "cge" else (4000 + 1) * 8)


def test_hybrid_fo_head_zo_body():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    true = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hy = Hybrid(model, zo=[CGE(model, params=model[0].parameters(), central=True, mu=1e-6)],
                fo_params=model[2].parameters())
    hy.backward(F.cross_entropy, x, y)
    for p, t in zip(model.parameters(), true):
        assert torch.allclose(p.grad, t, rtol=1e-5, atol=1e-9)
    assert hy.queries > 0


def test_blackbox_max_batch_splits_calls_and_checks_the_budget_first():
    sizes = []

    def api(z):
        assert z.shape[0] <= 4, "the API takes at most 4 samples per call"
        sizes.append(z.shape[0])
        return z * 3

    bb = BlackBox(api, budget=20, max_batch=4)
    x = torch.randn(10, 2)
    assert torch.equal(bb(x), x * 3)
    assert sizes == [4, 4, 2] and bb.queries == 10
    with pytest.raises(BudgetExceeded, match="10 of 20"):
        bb(torch.zeros(11, 2))                    # refused whole: no chunk is sent
    assert sizes == [4, 4, 2] and bb.queries == 10
    with pytest.raises(ValueError, match="max_batch"):
        BlackBox(api, max_batch=0)


def test_blackbox_query_state_round_trip_keeps_a_spent_budget():
    bb = BlackBox(torch.tanh, budget=10, name="api")
    bb(torch.zeros(7, 2))
    state = bb.query_state()
    assert state == {"queries": 7, "budget": 10}
    fresh = BlackBox(torch.tanh, budget=1000, name="api")
    fresh.load_query_state(state)
    assert fresh.queries == 7 and fresh.budget == 10 and fresh.remaining == 3
    with pytest.raises(BudgetExceeded):
        fresh(torch.zeros(4, 2))
    raised = BlackBox(torch.tanh, budget=1000, name="api")
    raised.load_query_state(state, budget=False)  # a resume that raises the budget on purpose
    assert raised.queries == 7 and raised.remaining == 993
    with pytest.raises(ValueError, match="queries"):
        fresh.load_query_state({"queries": -1, "budget": None})


@pytest.mark.parametrize("device", DEVICES)
def test_a_black_box_answering_in_numpy_or_on_another_device_answers_beside_its_input(device):
    """A query-only model (a NumPy program, a server, a CPU model) inside a model on ``device``: its
    answers come back on ``device``, where the next layer runs, with their own dtype."""
    W = torch.randn(3, 4, dtype=torch.float64)
    numpy_box = BlackBox(lambda h: (h.cpu().double() @ W.T).numpy(), max_batch=2)
    cpu_box = BlackBox(lambda h: h.cpu() @ W.T.float())
    x = torch.randn(5, 4, device=device)
    for box, dtype in ((numpy_box, torch.float64), (cpu_box, torch.float32)):
        out = box(x)
        assert out.device == x.device and out.dtype == dtype and out.shape == (5, 3)
        assert torch.allclose(out.cpu().double(), x.cpu().double() @ W.T, atol=1e-5)
