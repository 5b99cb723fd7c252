"""lean_forward: the same function as model(x) with BatchNorm/ReLU in place, at lower peak memory."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import MeZO
from core.models import Normalize, small_cnn
from core.models.lean import lean_forward, supports_lean


def _cnn(momentum=0.1):
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.13], [0.31]), small_cnn(3, 16, 1, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("train", [True, False])
def test_equals_model_forward_and_moves_running_stats_alike(momentum, train):
    a = _cnn(momentum).train(train)
    b = copy.deepcopy(a)
    x = torch.rand(32, 1, 28, 28)
    x0 = x.clone()
    with torch.no_grad():
        for _ in range(2):                       # twice: the cumulative average uses the batch count
            want = a(x)
            got = lean_forward(b, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0)                    # the caller's input is never written
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(bb, ba, rtol=1e-6, atol=1e-7, msg=n)


def test_lower_peak_memory_than_model_forward():
    from applications.edge_kd.counters import peak_bytes

    model = _cnn().train()
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        model(x)
        lean_forward(model, x)                   # warm-up
        plain = peak_bytes(lambda: model(x))
        lean = peak_bytes(lambda: lean_forward(model, x))
    first_block = 64 * 16 * 28 * 28 * 4
    assert plain >= 2 * first_block              # conv and BN outputs alive together
    assert lean < 1.5 * first_block              # one map, its pooled quarter, the input, slices


def test_falls_back_where_in_place_is_unsafe():
    seen = []
    model = _cnn()
    model[1][0].register_forward_hook(lambda m, i, o: seen.append(o))
    assert not supports_lean(model)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        lean_forward(model, x)
    assert seen and seen[0].min() < 0            # the hooked conv output was not rectified in place
    assert not supports_lean(nn.ModuleList([nn.ReLU()]))


def test_shared_outputs_are_not_written():
    """ReLU after a module whose output may be shared (Identity returns its input) is not in place."""
    model = nn.Sequential(nn.Identity(), nn.ReLU(), nn.BatchNorm1d(3))
    x = torch.randn(8, 3)
    x0 = x.clone()
    out = lean_forward(model, x)
    assert torch.equal(x, x0)
    torch.testing.assert_close(out, F.batch_norm(x0.relu(), None, None, model[2].weight, model[2].bias, True))


def test_mezo_lean_equals_plain_mezo():
    """In float64 (MeZO divides loss differences by 2μ, which magnifies float32 rounding)."""
    a, b = _cnn().double(), _cnn().double()
    x, y = torch.rand(16, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (16,))
    za, zb = MeZO(a, mu=1e-3, q=2, seed=3), MeZO(b, mu=1e-3, q=2, seed=3, lean=True)
    for _ in range(2):
        la, lb = za.estimate(F.cross_entropy, x, y), zb.estimate(F.cross_entropy, x, y)
        za.step(0.05), zb.step(0.05)
        torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-9, atol=1e-10)
    assert za.queries == zb.queries


def test_one_value_per_channel_in_training_is_refused_as_batchnorm_refuses():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        lean_forward(model, torch.randn(1, 4))


def test_layers_that_return_more_than_a_tensor_see_the_whole_batch():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, return_indices=True))
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        want, got = model(x), lean_forward(model, x)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
