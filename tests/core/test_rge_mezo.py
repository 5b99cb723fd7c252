import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from core import RGE, MeZO
from core.estimators.mezo import direction_seed
from tests.core.toy_models import mlp


class Quadratic(nn.Module):
    """f(θ) = ½ θᵀAθ + bᵀθ: exact gradient Aθ + b (an oracle)."""

    def __init__(self, d=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.theta = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.A = torch.diag(torch.linspace(1.0, 3.0, d, dtype=torch.float64))
        self.b = torch.randn(d, generator=g, dtype=torch.float64)

    def loss(self, model=None):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def grad(self):
        return self.A @ self.theta.detach() + self.b


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_rge_mean_converges_to_true_gradient(distribution, antithetic):
    """Statistical test, fixed seed: the mean of 4,000 single-direction estimates lies within 10% of ∇f.

    With μ = 1e-4 the bias is O(μ); the standard error of the mean is ≈ ‖∇f‖·sqrt(d/4000) ≈ 4%,
    so a wrong scale (e.g. missing the factor d for the sphere) fails by a wide margin.
    """
    model = Quadratic()
    zo = RGE(model, q=4000, mu=1e-4, distribution=distribution, antithetic=antithetic, seed=0)
    zo.backward(model.loss)
    err = (model.theta.grad - model.grad()).norm() / model.grad().norm()
    assert err < 0.10, f"relative error {err:.3f}"
    assert zo.queries == (2 * 4000 + 1 if antithetic else 4000 + 1)


def test_rge_single_direction_has_wrong_direction_often_but_right_scale():
    model = Quadratic()
    zo = RGE(model, q=1, mu=1e-4, distribution="sphere", seed=1)
    norms = []
    for _ in range(300):
        zo.backward(model.loss)
        norms.append(model.theta.grad.norm())
    # E‖ĝ‖² = d·‖∇f‖² for sphere directions scaled by d: mean squared norm ≈ d·‖∇f‖²
    ratio = torch.stack(norms).pow(2).mean() / (6 * model.grad().norm() ** 2)
    assert 0.7 < ratio < 1.3


def test_rge_restores_parameters_exactly_and_is_reproducible():
    model = mlp().double()
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 4, (5,))
    before = [p.clone() for p in model.parameters()]
    RGE(model, q=5, seed=3).backward(F.cross_entropy, x, y)
    g1 = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    RGE(model, q=5, seed=3).backward(F.cross_entropy, x, y)
    for a, p in zip(g1, model.parameters()):
        assert torch.equal(a, p.grad)


def test_mezo_matches_spsa_formula_and_restores_parameters():
    model = Quadratic()
    before = model.theta.detach().clone()
    zo = MeZO(model, mu=1e-5, q=3000, seed=0)
    zo.backward(model.loss)
    assert torch.allclose(model.theta.detach(), before, atol=1e-12)   # in-place restore (float64)
    err = (model.theta.grad - model.grad()).norm() / model.grad().norm()
    assert err < 0.1
    assert zo.queries == 2 * 3000


def test_mezo_step_equals_sgd_on_its_gradient():
    torch.manual_seed(0)
    a, b = mlp().double(), mlp().double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 4, (8,))
    za, zb = MeZO(a, q=2, seed=5), MeZO(b, q=2, seed=5)
    za.backward(F.cross_entropy, x, y)
    torch.optim.SGD(a.parameters(), lr=0.1).step()
    zb.estimate(F.cross_entropy, x, y)
    zb.step(lr=0.1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-12)


class _RandomTensorTracker(TorchDispatchMode):
    """Records, at every random draw, the total size of random-drawn tensors still alive."""

    def __init__(self):
        super().__init__()
        self.live: list[weakref.ref] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "normal" in func.__name__ or "randn" in func.__name__:
            self.live = [r for r in self.live if r() is not None]
            self.live.append(weakref.ref(out))
            self.peak = max(self.peak, sum(r().numel() for r in self.live if r() is not None))
        return out


def test_mezo_never_holds_more_than_one_parameter_sized_direction():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    zo = MeZO(model, q=2, seed=0)
    largest = max(p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), _RandomTensorTracker() as tracker:
        zo.estimate(F.cross_entropy, x, y)
        zo.step(lr=0.01)
    assert tracker.peak > 0
    assert tracker.peak <= largest < total


# -- MeZO: BatchNorm statistics, direction seeds, exact restore, resume ----------------------------
def test_mezo_in_train_mode_moves_batchnorm_running_stats_like_one_forward():
    torch.manual_seed(0)
    model = mlp().double().train()
    reference = mlp().double().train()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 4, (8,))
    zo = MeZO(model, q=3, seed=0)
    loss = zo.backward(F.cross_entropy, x, y)
    with torch.no_grad():
        expected_loss = F.cross_entropy(reference(x), y)        # one ordinary training forward
    for a, b in zip(model.buffers(), reference.buffers()):
        assert torch.equal(a, b)
    assert not torch.equal(model[2].running_mean, torch.zeros(8, dtype=torch.float64))
    assert torch.equal(loss, expected_loss)
    assert zo.queries == 2 * 3 * 8 + 8                          # 2q perturbed + the unperturbed forward
    model.eval()                                                 # eval mode: no extra forward
    MeZO(model, q=3, seed=0).backward(F.cross_entropy, x, y)
    for a, b in zip(model.buffers(), reference.buffers()):
        assert torch.equal(a, b)


def test_mezo_directions_never_repeat_across_steps_for_large_q():
    """The former seed (seed·7919 + step)·131 + r gave step t, r = 131 the direction of step t+1, r = 0."""
    p = nn.Parameter(torch.zeros(5))
    zo = MeZO(nn.Linear(5, 1), q=200, seed=0)
    seeds = {direction_seed(zo.seed, t, r, i) for t in range(3) for r in range(200) for i in range(2)}
    assert len(seeds) == 3 * 200 * 2
    z = torch.stack([zo._direction(t, r, 0, p, None) for t in range(3) for r in range(200)])
    assert len(torch.unique(z, dim=0)) == 3 * 200


def test_mezo_restores_float32_parameters_bit_exactly_after_many_estimates():
    torch.manual_seed(0)
    model = mlp().train()                                        # float32, BatchNorm in train mode
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    zo = MeZO(model, mu=1e-3, q=4, seed=1)
    for _ in range(5):
        zo.estimate(F.cross_entropy, x, y)
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p)


def test_mezo_resume_from_state_dict_reproduces_the_run():
    torch.manual_seed(0)
    a, b = mlp().double(), mlp().double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 4, (8,))
    za = MeZO(a, q=2, seed=7)
    for _ in range(3):
        za.estimate(F.cross_entropy, x, y)
        za.step(lr=0.1)
    zb = MeZO(b, q=2, seed=7)
    for _ in range(2):
        zb.estimate(F.cross_entropy, x, y)
        zb.step(lr=0.1)
    resumed = MeZO(b, q=2, seed=123)
    resumed.load_state_dict(zb.state_dict())
    resumed.estimate(F.cross_entropy, x, y)
    resumed.step(lr=0.1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert resumed.queries == za.queries
