"""ZO estimates run in full float32 (no TF32 or bf16 math, whatever the user set), and the user's
settings come back afterwards, also after an exception mid-step."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from core import CGE, RGE, MeZO, input_space_backward, objective
from core.estimators.precision import _backends, ieee_float32, restore, snapshot
from core.sparsity import zo_grasp_scores
from tests.core.devices import DEVICES
from tests.core.toy_models import small_cnn


def _flags() -> tuple[str, ...]:
    return tuple(flag.fp32_precision for flag in _backends())


_PRODUCTS = {"conv2d", "linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum"}


class _Seen(TorchFunctionMode):
    """The precision flags in force at every convolution or matrix product made inside the block."""

    def __init__(self):
        super().__init__()
        self.flags: set[tuple[str, ...]] = set()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _PRODUCTS:
            self.flags.add(_flags())
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _everything() -> list:
    """Every float32 setting a user can read, through both APIs ("raises": PyTorch refuses to read it
    because the two APIs disagree)."""
    out = []
    for get in (torch.get_float32_matmul_precision, lambda: torch.backends.cudnn.allow_tf32,
                lambda: torch.backends.cuda.matmul.allow_tf32, lambda: torch.backends.fp32_precision,
                lambda: torch.backends.cudnn.fp32_precision, lambda: torch.backends.mkldnn.fp32_precision):
        try:
            out.append(get())
        except RuntimeError:
            out.append("raises")
    return out + list(_flags())


@pytest.fixture
def users_settings():
    """Whatever a test sets comes back afterwards (the global and per-backend levels too)."""
    levels = [(obj, obj.fp32_precision) for obj in (torch.backends, torch.backends.cudnn, torch.backends.mkldnn)]
    saved = snapshot()
    yield
    for obj, value in levels:
        obj.fp32_precision = value
    restore(saved)


@pytest.fixture
def reduced_precision(users_settings):
    """The user asked for TF32/bf16 float32 math (cuDNN convs are TF32 by default already)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    return _flags()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


def _cge(m, x, y):
    CGE(m, mu=5e-3).backward(F.cross_entropy, x, y)


def _naive(m, x, y):
    CGE(m, mu=5e-3, engine="naive").backward(F.cross_entropy, x, y)


def _rge(m, x, y):
    RGE(m, q=3, seed=0).backward(objective(lambda mod: F.cross_entropy(mod(x), y)))


def _mezo(m, x, y):
    MeZO(m, q=2, seed=0).backward(F.cross_entropy, x, y)


def _mezo_estimate(m, x, y):
    MeZO(m, q=2, seed=0).estimate(F.cross_entropy, x, y)


def _grasp(m, x, y):
    zo_grasp_scores(m, F.cross_entropy, x, y, q=2, generator=torch.Generator().manual_seed(0))


def _input_space(m, x, y):
    z = m[0](x)
    input_space_backward(lambda zz: F.cross_entropy(m[1:](zz), y.repeat(len(zz) // len(y)), reduction="none"), z,
                         chunk=64)


PATHS = {"cge": _cge, "cge-naive": _naive, "rge": _rge, "mezo": _mezo, "mezo-estimate": _mezo_estimate,
         "zo-grasp": _grasp, "input-space": _input_space}


@pytest.mark.parametrize("path", PATHS)
def test_every_zo_evaluation_runs_in_full_float32_and_the_users_settings_return(path, reduced_precision):
    torch.manual_seed(0)
    model, (x, y) = small_cnn(), _data()
    seen = _Seen()
    with seen:
        PATHS[path](model, x, y)
    assert seen.calls > 0
    ieee = ("ieee",) * len(_backends())
    if path == "input-space":                 # the white-box stage and its backprop stay the user's
        assert ieee in seen.flags and reduced_precision in seen.flags, seen.flags
    else:
        assert seen.flags == {ieee}, seen.flags
    assert _flags() == reduced_precision


def test_the_users_settings_return_after_an_exception_mid_step(reduced_precision):
    torch.manual_seed(0)
    model, (x, y) = small_cnn(), _data()
    calls = []

    def interrupted(m):
        calls.append(_flags())
        if len(calls) == 3:
            raise KeyboardInterrupt
        return F.cross_entropy(m(x), y)

    with pytest.raises(KeyboardInterrupt):
        CGE(model, mu=5e-3).backward(objective(interrupted))
    assert set(calls) == {("ieee",) * len(_backends())}
    assert _flags() == reduced_precision


@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_float32_estimates_on_a_gpu_are_as_close_to_the_exact_difference_as_float32_allows(device, engine,
                                                                                           reduced_precision):
    """The float32 CGE gradient within 2e-3 (relative) of the float64 one: measured 3e-4 on a CPU.
    TF32 (a GPU's default for convolutions) would round each product to 2^-11 and, divided by μ,
    miss this by far. (This CPU does the same float32 math whatever the flags say.)"""
    torch.manual_seed(0)
    model, (x, y) = small_cnn(), _data()
    exact = copy.deepcopy(model).double()
    CGE(exact, mu=5e-3, engine="naive").backward(F.cross_entropy, x.double(), y)
    model = model.to(device)
    CGE(model, mu=5e-3, engine=engine).backward(F.cross_entropy, x.to(device), y.to(device))
    g32 = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().cpu()
    g64 = torch.cat([p.grad.reshape(-1) for p in exact.parameters()])
    assert ((g32 - g64).norm() / g64.norm()).item() < 2e-3


STARTS = {
    "default": lambda: None,
    "matmul high": lambda: torch.set_float32_matmul_precision("high"),
    "matmul medium": lambda: torch.set_float32_matmul_precision("medium"),
    "old api: cudnn tf32 off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "old api: matmul tf32 on": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "new api: all ieee": lambda: setattr(torch.backends, "fp32_precision", "ieee"),
    "new api: all tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "new api: oneDNN conv bf16": lambda: setattr(torch.backends.mkldnn.conv, "fp32_precision", "bf16"),
    "apis mixed: cudnn conv ieee": lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
}


@pytest.mark.parametrize("start", STARTS)
def test_the_switch_leaves_every_setting_as_it_found_it_and_readable_as_before(start, users_settings):
    """Through both of PyTorch's APIs: what could be read before can be read inside (a model's
    forward may call ``torch.backends.cudnn.flags``), and everything reads the same afterwards."""
    STARTS[start]()
    before = _everything()
    with ieee_float32():
        inside = _everything()
        assert _flags() == ("ieee",) * len(_backends())
        with ieee_float32():                          # nested: the inner one gives the outer's back
            pass
        assert _everything() == inside
        if before[1] != "raises":                     # (it rewrites the cuDNN flags on its way out)
            with torch.backends.cudnn.flags(enabled=True):
                pass
    assert not any(i == "raises" and b != "raises" for b, i in zip(before, inside)), (before, inside)
    assert _everything() == before
