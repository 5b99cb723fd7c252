import pytest
import torch
import torch.nn.functional as F

from core.models import ResNet20, count_params, lenet5, small_cnn
from core import CGE, SparsityPlan
from tests.core.devices import DEVICES


def test_parameter_counts_match_the_paper():
    assert [count_params(small_cnn(d, 18, 3)) for d in range(1, 6)] == [730, 3700, 6670, 9640, 12610]
    assert count_params(small_cnn(3, 18, 1)) == 6346
    assert 269_000 < count_params(ResNet20()) < 271_000
    assert lenet5()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_engine_on_resnet20_equals_naive_loop(device):
    """Residual adds, option-A shortcuts (slicing + pad: the generic path) and strided convs."""
    torch.manual_seed(0)
    model = ResNet20().double().to(device)
    convs = [p for n, p in model.named_parameters() if p.dim() == 4]
    plan = SparsityPlan(model, {n: 0.998 for n, p in model.named_parameters() if p.dim() == 4}, seed=1)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(device), torch.tensor([1, 7], device=device)
    fast = CGE(model, params=convs, sparsity=plan)
    fast.backward(F.cross_entropy, x, y)
    g_fast = torch.cat([p.grad.reshape(-1) for p in convs])
    CGE(model, params=convs, sparsity=plan, engine="naive").backward(F.cross_entropy, x, y)
    g_naive = torch.cat([p.grad.reshape(-1) for p in convs])
    assert fast.last_engine == "fast" and fast.num_active() > 400
    assert (g_fast - g_naive).norm() <= 1e-8 * g_naive.norm()
