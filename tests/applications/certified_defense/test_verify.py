"""White-box comparator: auto-LiRPA bounds (soundness, a closed-form oracle) and verified ≤ PGD ≤ clean.

Oracles and invariants:
- one Linear layer z = Wx + b has exact bounds Wx + b ± ε‖W_row‖_dual (margins: ε‖W_y − W_j‖_dual);
  IBP and CROWN must contain them and CROWN must equal them;
- soundness: at random and adversarial points of the ball every margin is ≥ its computed lower bound;
- per sample, verified ⇒ PGD-robust ⇒ correct.
Random parts use fixed seeds; the soundness checks are one-sided with a 1e-5 float tolerance.
Tiny models on 8×8 one-channel images keep each test to a few seconds on one core.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from applications.certified_defense import lirpa_compat
from applications.certified_defense.verify import (margin_lower_bounds, margin_spec, pgd_accuracy,
                                                   pgd_attack, prepare_for_lirpa, verified_accuracy,
                                                   verify_report)
from core.models import DnCNN, Normalize, small_cnn

TOL = 1e-5
EPS = {"inf": 0.03, "2": 0.3}


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine BN parameters, so eval-mode BN matters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def _classifier(seed: int = 0) -> nn.Module:
    """Normalize → small_cnn(depth 1, width 4): conv, BN, ReLU, MaxPool, AdaptiveAvgPool, Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize([0.5], [0.25]), small_cnn(depth=1, width=4, in_channels=1))
    _randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _denoised_classifier(seed: int = 0) -> nn.Module:
    """DnCNN(depth 3, width 8) with a non-zero last conv (so D is not the identity) → classifier."""
    torch.manual_seed(seed + 1)
    denoiser = DnCNN(in_channels=1, depth=3, width=8)
    nn.init.normal_(denoiser.body[-1].weight, std=0.05)
    _randomize_batchnorm(denoiser, torch.Generator().manual_seed(seed + 1))
    return nn.Sequential(denoiser, _classifier(seed)).eval()


MODELS = {"classifier": _classifier, "denoiser+classifier": _denoised_classifier}


def _data(model: nn.Module, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (some pixels at 0 and 1, so the ℓ∞ clipping matters) and labels: the model's
    predictions with every fourth one changed, so clean accuracy is 0.75."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand((n, 1, 8, 8), generator=g) * 1.2 - 0.1).clamp(0, 1)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::4] = (y[::4] + 1) % 10
    return x, y


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True margins z_y − z_j, ``[..., B, K]`` with +inf at j = y (the layout of the bounds)."""
    logits = model(x.flatten(0, 1)).reshape(*x.shape[:2], -1) if x.ndim == 5 else model(x)
    margins = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)) - logits
    return margins.masked_fill(nn.functional.one_hot(y, logits.shape[-1]).bool(), math.inf)


def _ball_points(x: torch.Tensor, eps: float, norm: str, n: int, g: torch.Generator) -> torch.Tensor:
    """``[n, B, ...]`` points of the verified set: ℓ∞ corners and interior of the box ∩ [0, 1];
    ℓ2 points on the sphere of radius ε (unclipped, as the ℓ2 bounds are)."""
    shape = (n, *x.shape)
    if norm == "inf":
        signs = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
        signs[n // 2:] *= torch.rand((n - n // 2, *x.shape), generator=g)
        return (x + eps * signs).clamp(0, 1)
    d = torch.randn(shape, generator=g)
    return x + eps * d / d.flatten(2).norm(dim=2).reshape(n, x.shape[0], *[1] * (x.ndim - 1))


def _norm2(t: torch.Tensor) -> torch.Tensor:
    """Per-sample ℓ2 norm of ``[B, C, H, W]``, shaped ``[B, 1, 1, 1]`` (never 0)."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]


def _adversarial_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                        steps: int = 10) -> torch.Tensor:
    """``[K, B, ...]``: for each class j, projected descent on the margin z_y − z_j (the bound's target)."""
    points = []
    for j in range(10):
        delta = torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            margin = (logits.gather(1, y[:, None]).squeeze(1) - logits[:, j]).sum()
            (grad,) = torch.autograd.grad(margin, delta)
            with torch.no_grad():
                if norm == "inf":
                    delta = (delta - eps / 4 * grad.sign()).clamp(-eps, eps)
                    delta = (x + delta).clamp(0, 1) - x
                else:
                    delta = delta - eps / 4 * grad / _norm2(grad)
                    delta = delta * (eps / _norm2(delta)).clamp(max=1)
        points.append((x + delta).detach())
    return torch.stack(points)


# --------------------------------------------------------------------------- compatibility patches

def test_import_applies_every_patch_once_and_auto_lirpa_works():
    """All five patches are needed on this stack; a second import changes nothing."""
    lirpa = lirpa_compat.import_auto_lirpa()
    applied = list(lirpa_compat.PATCHES_APPLIED)
    assert lirpa_compat.import_auto_lirpa() is lirpa and lirpa_compat.PATCHES_APPLIED == applied
    assert len(set(applied)) == len(applied)
    assert sys.modules["numpy.lib.arraysetops"].isin is np.isin                # patch 1
    assert torch.onnx.symbolic_helper._set_opset_version is not None            # patch 2
    assert hasattr(torch._C.Node, "__getitem__")                                # patch 3
    bm = lirpa.BoundedModule(nn.Linear(3, 2), torch.zeros(1, 3))                # traces: patches 2–3
    assert len(list(bm.parameters())) == 2                                      # patch 4


def test_alpha_crown_tightens_crown_on_a_relu_network():
    """Patch 5: without it alpha-CROWN's slopes get zero gradient and it returns CROWN's bound."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 10)).eval()
    x = torch.rand(4, 1, 4, 4)
    y = mlp(x).argmax(dim=1)
    crown = margin_lower_bounds(mlp, x, y, 0.05, method="CROWN")
    alpha = margin_lower_bounds(mlp, x, y, 0.05, method="alpha-CROWN", alpha_iterations=10)
    finite = crown.isfinite()
    assert (alpha[finite] >= crown[finite] - TOL).all()
    assert (alpha[finite] - crown[finite]).sum() > 1e-3


# --------------------------------------------------------------------------- closed-form oracle

@pytest.mark.parametrize("norm", ["inf", "2"])
def test_single_linear_layer_matches_the_exact_bounds(norm):
    """z = Wx + b over ‖δ‖_p ≤ ε: logits Wx + b ± ε‖W_i‖_q, margins c·(Wx + b) − ε‖cW‖_q (1/p + 1/q = 1).
    x stays ε away from 0 and 1, so the ℓ∞ clipping does not bind."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 5).eval()
    x, eps = torch.rand(6, 12) * 0.6 + 0.2, 0.1
    y = torch.arange(6) % 5
    q = 1 if norm == "inf" else 2
    lirpa = lirpa_compat.import_auto_lirpa()
    bm = lirpa.BoundedModule(layer, x)
    ptb = lirpa.PerturbationLpNorm(eps=eps, norm=np.inf if norm == "inf" else 2)
    z, radius = layer(x).detach(), eps * layer.weight.detach().norm(p=q, dim=1)
    for method in ("IBP", "CROWN"):
        lower, upper = bm.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), method=method)
        torch.testing.assert_close(lower, z - radius, rtol=0, atol=TOL)
        torch.testing.assert_close(upper, z + radius, rtol=0, atol=TOL)

    c = margin_spec(y, 5)                                                       # [B, 4, 5]
    exact = torch.einsum("bjk,bk->bj", c, z) - eps * (c @ layer.weight.detach()).norm(p=q, dim=2)
    others = ~nn.functional.one_hot(y, 5).bool()
    for method in ("IBP", "CROWN", "alpha-CROWN"):
        bound = margin_lower_bounds(layer, x, y, eps, norm=norm, method=method, alpha_iterations=2)
        assert (bound[others].reshape(6, 4) <= exact + TOL).all()
        if method != "IBP":
            torch.testing.assert_close(bound[others].reshape(6, 4), exact, rtol=0, atol=TOL)


def test_l2_bounds_through_a_skip_connection_are_sound():
    """auto-LiRPA 0.3's ℓ2 IBP drops the radius on a skip branch (x − R(x)); verify.py works around it.
    With R's last conv zero the model is exactly Linear(flatten(x)), whose minimum margin is known."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 10)
    model = nn.Sequential(DnCNN(in_channels=1, depth=3, width=4), nn.Flatten(), linear).eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.arange(4)
    eps = 0.5
    c = margin_spec(y, 10)
    exact = torch.einsum("bjk,bk->bj", c, linear(x.flatten(1))) - eps * (c @ linear.weight).norm(dim=2)
    others = ~nn.functional.one_hot(y, 10).bool()
    ibp = margin_lower_bounds(model, x, y, eps, norm="2", method="IBP")[others].reshape(4, 9)
    crown = margin_lower_bounds(model, x, y, eps, norm="2", method="CROWN")[others].reshape(4, 9)
    assert (ibp <= exact.detach() + TOL).all()
    torch.testing.assert_close(crown, exact.detach(), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- soundness by sampling

@pytest.mark.parametrize("method", ["IBP", "CROWN"])
@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_bounds_contain_sampled_and_attacked_margins(arch, norm, method):
    """Every margin at 64 random points of the ball (ℓ∞ corners/interior, ℓ2 sphere) and at 10
    adversarial points per sample is ≥ the lower bound."""
    model = MODELS[arch]()
    x, y = _data(model, n=4)
    eps = EPS[norm]
    bound = margin_lower_bounds(model, x, y, eps, norm=norm, method=method)
    assert bound.shape == (4, 10) and torch.isinf(bound.gather(1, y[:, None])).all()
    with torch.no_grad():
        sampled = _margins(model, _ball_points(x, eps, norm, 64, torch.Generator().manual_seed(1)), y)
    attacked = _margins(model, _adversarial_points(model, x, y, eps, norm), y).detach()
    for margins in (sampled, attacked):
        assert (margins >= bound - TOL).all(), (margins - bound).min()


def test_alpha_crown_is_sound_and_not_looser_than_crown():
    model = _classifier()
    x, y = _data(model, n=4)
    crown = margin_lower_bounds(model, x, y, EPS["inf"], method="CROWN")
    alpha = margin_lower_bounds(model, x, y, EPS["inf"], method="alpha-CROWN", alpha_iterations=3)
    finite = crown.isfinite()
    assert (alpha[finite] >= crown[finite] - TOL).all()
    attacked = _margins(model, _adversarial_points(model, x, y, EPS["inf"], "inf"), y).detach()
    assert (attacked >= alpha - TOL).all()


def test_normalize_is_replaced_by_an_identical_conv():
    model = _classifier()
    prepared = prepare_for_lirpa(model)
    assert not any(isinstance(m, Normalize) for m in prepared.modules())
    assert any(isinstance(m, Normalize) for m in model.modules())               # original untouched
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- verified ≤ PGD ≤ clean

def test_report_orders_verified_pgd_and_clean_for_both_models():
    """Rows for both models; ε = 0.1 and 0.5 give verified < PGD and PGD < clean on these tiny
    random networks (checked below, so the ordering is not tested vacuously)."""
    models = {name: build() for name, build in MODELS.items()}
    x, y = _data(models["classifier"], n=8)
    rows = verify_report(models, x, y, eps_list=[0.0, 0.1, 0.5], norms=("inf", "2"),
                         methods=("IBP", "CROWN"), pgd_steps=10)
    assert len(rows) == 2 * 2 * 3 * 2
    assert {r["model"] for r in rows} == set(MODELS)
    for row in rows:
        assert row["consistent"]
        assert row["verified_accuracy"] <= row["pgd_accuracy"] <= row["clean_accuracy"] == 0.75, row
        if row["eps"] == 0:                       # the ball is the point: the bound is the margin itself
            assert row["verified_accuracy"] == row["pgd_accuracy"] == row["clean_accuracy"], row
    assert any(r["verified_accuracy"] < r["pgd_accuracy"] for r in rows)
    assert any(r["pgd_accuracy"] < r["clean_accuracy"] for r in rows)


def test_report_flags_or_raises_an_unsound_bound(monkeypatch):
    """A fake verifier that 'verifies' everything contradicts PGD: the check must catch it."""
    import applications.certified_defense.verify as verify

    def everything_verified(model, x, y, eps, **kwargs):
        return 1.0, torch.ones(x.shape[0], 10)
    monkeypatch.setattr(verify, "verified_accuracy", everything_verified)
    model = _classifier()
    x, y = _data(model, n=8)
    with pytest.raises(RuntimeError, match="unsound"):
        verify.verify_report({"m": model}, x, y, [0.05], ("inf",), ("IBP",), pgd_steps=5)
    rows = verify.verify_report({"m": model}, x, y, [0.05], ("inf",), ("IBP",), pgd_steps=5,
                                on_violation="flag")
    assert rows[0]["consistent"] is False


def test_bounds_and_attacks_run_in_full_float32_whatever_the_user_set(monkeypatch):
    """A GPU's default TF32 convolutions would make a bound, and "verified", unsound: the whole report
    runs with float32 in full precision, and the user's settings come back."""
    import applications.certified_defense.verify as verify
    from core.estimators.precision import _backends, restore, snapshot

    seen = []
    real = verify.verified_accuracy

    def watched(*args, **kwargs):
        seen.append({flag.fp32_precision for flag in _backends()})
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "verified_accuracy", watched)
    model = _classifier()
    x, y = _data(model, n=4)
    saved = snapshot()
    try:
        torch.set_float32_matmul_precision("high")
        before = [flag.fp32_precision for flag in _backends()]
        verify.verify_report({"m": model}, x, y, [0.05], ("inf",), ("IBP",), pgd_steps=2)
        assert seen == [{"ieee"}]
        assert [flag.fp32_precision for flag in _backends()] == before
    finally:
        restore(saved)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_pgd_stays_in_the_ball_and_is_seeded(norm):
    model = _classifier()
    x, y = _data(model, n=8)
    eps = EPS[norm]
    acc = [pgd_accuracy(model, x, y, eps, norm=norm, steps=5, restarts=2,
                        generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert acc[0] == acc[1] <= 0.75
    assert pgd_accuracy(model, x, y, 0.0, norm=norm, generator=torch.Generator()) == 0.75
    robust = pgd_attack(model, x, y, eps, norm=norm, steps=5, generator=torch.Generator().manual_seed(0))
    assert robust.dtype == torch.bool and robust.shape == (8,)


def test_verified_accuracy_returns_fraction_and_margins():
    model = _classifier()
    x, y = _data(model, n=8)
    acc, margins = verified_accuracy(model, x, y, 0.0, method="IBP")
    assert acc == 0.75 and margins.shape == (8, 10)
    clean = _margins(model, x, y).detach()
    torch.testing.assert_close(margins, clean, rtol=0, atol=1e-4)       # ε = 0: bounds are the margins


@pytest.mark.parametrize("bad", [dict(norm="1"), dict(method="CROWN-IBP"), dict(eps=-0.1)])
def test_bad_arguments_raise_value_error(bad):
    model = _classifier()
    x, y = _data(model, n=2)
    kwargs = dict(eps=0.01, norm="inf", method="IBP") | bad
    eps = kwargs.pop("eps")
    with pytest.raises(ValueError):
        verified_accuracy(model, x, y, eps, **kwargs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        verified_accuracy(model, x * 3, y, 0.01)
