"""CERTIFY / PREDICT (Cohen et al. 2019) against closed-form oracles.

Oracles: the Clopper–Pearson bound solves P[Bin(n, p) ≥ nA] = alpha (a direct binomial sum); a constant
classifier certifies exactly σ·Φ⁻¹(alpha^(1/n)); the smoothed sign classifier at x₀ = σ/2 has
p_A = Φ(1/2) and the exact radius σ/2. Tests that depend on the noise fix the generator's seed and
say so; their tolerances are derived from the binomial standard deviation.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from applications.certified_defense.smoothing import ABSTAIN, Smooth, lower_confidence_bound


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P[Bin(n, p) ≥ k], summed term by term."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def constant(label: int, num_classes: int = 10):
    """f(z) = label for every input, as logits."""
    def f(z: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(z.shape[0], num_classes, dtype=z.dtype, device=z.device)
        logits[:, label] = 1.0
        return logits
    return f


def sign_of_first(z: torch.Tensor) -> torch.Tensor:
    """f(z) = 1[z₀ > 0] as labels, for points z ∈ R^d (batch [N, d])."""
    return (z[:, 0] > 0).long()


# ------------------------------------------------------------------------------------------------
# Clopper–Pearson


@pytest.mark.parametrize("n", [1, 7, 100, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_lower_bound_when_every_trial_succeeds_is_alpha_to_the_one_over_n(n, alpha):
    # P[Bin(n, p) = n] = p^n = alpha  <=>  p = alpha^(1/n)
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-10)


def test_lower_bound_is_zero_without_successes():
    assert lower_confidence_bound(0, 50, 0.001) == 0.0


@pytest.mark.parametrize("nA", [1, 5, 10, 17, 19])
def test_lower_bound_solves_the_binomial_tail_equation(nA):
    """Clopper–Pearson: pABar is the p at which observing ≥ nA successes has probability exactly alpha."""
    n, alpha = 20, 0.01
    pABar = lower_confidence_bound(nA, n, alpha)
    assert _binomial_upper_tail(nA, n, pABar) == pytest.approx(alpha, rel=1e-7)
    # and it is the smallest such p: the tail is increasing in p
    below, above = pABar * (1 - 1e-3), pABar * (1 + 1e-3)
    assert _binomial_upper_tail(nA, n, below) < alpha < _binomial_upper_tail(nA, n, above)


def test_lower_bound_is_monotone_and_below_the_estimate():
    n, alpha = 1000, 0.001
    bounds = [lower_confidence_bound(nA, n, alpha) for nA in range(0, n + 1, 50)]
    assert bounds == sorted(bounds)
    assert all(b <= nA / n for b, nA in zip(bounds, range(0, n + 1, 50), strict=True))


@pytest.mark.parametrize(("nA", "n", "alpha", "named"), [
    (3, 0, 0.1, "n=0"), (-1, 5, 0.1, "nA=-1"), (6, 5, 0.1, "nA=6"), (3, 5, 0.0, "alpha=0.0"),
    (3, 5, 1.0, "alpha=1.0"),
])
def test_lower_bound_rejects_bad_arguments(nA, n, alpha, named):
    with pytest.raises(ValueError, match=named):
        lower_confidence_bound(nA, n, alpha)


# ------------------------------------------------------------------------------------------------
# CERTIFY


@pytest.mark.parametrize("labels_only", [False, True])
def test_constant_classifier_certifies_the_largest_radius_exactly(labels_only):
    """nA = n always, so pABar = alpha^(1/n) and R = σ·Φ⁻¹(alpha^(1/n)) ≈ 0.80 at σ = 0.25, n = 10k."""
    sigma, n, alpha = 0.25, 10_000, 0.001
    f = (lambda z: torch.full((z.shape[0],), 3)) if labels_only else constant(3)
    smooth = Smooth(f, num_classes=10, sigma=sigma, labels_only=labels_only)
    prediction, radius = smooth.certify(torch.rand(1, 2, 2), n0=100, n=n, alpha=alpha, batch_size=n,
                                        generator=_gen())
    assert prediction == 3
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-12)
    assert radius == pytest.approx(0.80, abs=1e-3)


def test_certify_abstains_on_a_fifty_fifty_split():
    """Alternating labels: nA = n/2 exactly, so pABar < 1/2 and CERTIFY must abstain (no randomness)."""
    def alternating(z):
        return torch.arange(z.shape[0]) % 2
    smooth = Smooth(alternating, num_classes=2, sigma=0.5, labels_only=True)
    assert smooth.certify(torch.zeros(3), n0=10, n=1000, alpha=0.001, batch_size=100,
                          generator=_gen()) == (ABSTAIN, 0.0)


@pytest.mark.parametrize("n", [10_000, 100_000])
def test_sign_classifier_radius_approaches_the_exact_radius_from_below(n):
    """f(z) = 1[z₀ > 0] at x = (σ/2, 0): p_A = Φ(1/2), exact radius σ·Φ⁻¹(p_A) = σ/2.

    Probabilistic (seed 0): the guarantee says R < σ/2 except with probability alpha; the gap is
    about σ·(Φ⁻¹(p_A) − Φ⁻¹(p_A − (z_alpha + z) s)) with s = sqrt(p_A(1 − p_A)/n); we allow z ≤ 4.
    """
    sigma, alpha = 0.25, 0.001
    pA = norm.cdf(0.5)
    s = math.sqrt(pA * (1 - pA) / n)
    smallest = sigma * norm.ppf(pA - (norm.ppf(1 - alpha) + 4) * s)
    smooth = Smooth(sign_of_first, num_classes=2, sigma=sigma, labels_only=True)
    x = torch.tensor([0.5 * sigma, 0.0], dtype=torch.float64)
    prediction, radius = smooth.certify(x, n0=100, n=n, alpha=alpha, batch_size=50_000, generator=_gen(0))
    assert prediction == 1
    assert smallest < radius < 0.5 * sigma


def test_certify_is_a_function_of_the_generator_only():
    smooth = Smooth(sign_of_first, num_classes=2, sigma=0.25, labels_only=True)
    x = torch.tensor([0.1, 0.0])
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    a = smooth.certify(x, 10, 500, 0.01, 64, generator=_gen(7))
    b = smooth.certify(x, 10, 500, 0.01, 64, generator=_gen(7))
    c = smooth.certify(x, 10, 500, 0.01, 64, generator=_gen(8))
    assert a == b != c
    assert torch.equal(torch.get_rng_state(), global_state)   # global RNG untouched


def test_noise_takes_device_and_dtype_from_the_input():
    seen = []

    def f(z):
        seen.append((z.dtype, z.device))
        return constant(0, 2)(z)
    smooth = Smooth(f, num_classes=2, sigma=0.1)
    smooth.certify(torch.zeros(2, 2, dtype=torch.float64), 1, 5, 0.1, 5, generator=_gen())
    assert set(seen) == {(torch.float64, torch.device("cpu"))}


# ------------------------------------------------------------------------------------------------
# PREDICT


def test_predict_abstains_when_two_classes_split_evenly():
    """Alternating labels: nA = nB, p-value 1 > alpha (deterministic)."""
    smooth = Smooth(lambda z: torch.arange(z.shape[0]) % 2, num_classes=3, sigma=0.5, labels_only=True)
    assert smooth.predict(torch.zeros(4), n=1000, alpha=0.001, batch_size=128, generator=_gen()) == ABSTAIN


def test_predict_abstains_when_a_random_classifier_is_fifty_fifty():
    """f = 1[z₀ > 0] at x₀ = 0: each sample is a fair coin. Under this null PREDICT answers with
    probability ≤ alpha; seed 0 (and the test's premise) says it abstains."""
    smooth = Smooth(sign_of_first, num_classes=2, sigma=0.25, labels_only=True)
    prediction = smooth.predict(torch.zeros(2), n=10_000, alpha=0.001, batch_size=10_000, generator=_gen(0))
    assert prediction == ABSTAIN


def test_predict_returns_the_class_on_a_clear_majority():
    """x₀ = 2σ: p_A = Φ(2) ≈ 0.977, so with n = 1000 the test rejects overwhelmingly (seed 0)."""
    smooth = Smooth(sign_of_first, num_classes=2, sigma=0.25, labels_only=True)
    x = torch.tensor([0.5, 0.0])
    assert smooth.predict(x, n=1000, alpha=0.001, batch_size=256, generator=_gen(0)) == 1
    assert smooth.predict(-x, n=1000, alpha=0.001, batch_size=256, generator=_gen(0)) == 0


# ------------------------------------------------------------------------------------------------
# batching and validation


@pytest.mark.parametrize("batch_size", [1, 4, 7, 1000])
def test_classifier_never_sees_more_than_batch_size_images(batch_size):
    sizes = []

    def f(z):
        assert z.dim() == 4
        sizes.append(z.shape[0])
        return constant(1, 3)(z)
    smooth = Smooth(f, num_classes=3, sigma=0.25)
    x = torch.rand(3, 4, 4)
    smooth.certify(x, n0=9, n=30, alpha=0.01, batch_size=batch_size, generator=_gen())
    assert max(sizes) <= batch_size and sum(sizes) == 9 + 30
    sizes.clear()
    smooth.predict(x, n=30, alpha=0.01, batch_size=batch_size, generator=_gen())
    assert max(sizes) <= batch_size and sum(sizes) == 30


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"n0": 0}, "n0=0"), ({"n": 0, "n0": 0}, "n0=0"), ({"n0": 1, "n": 0}, "n=0"), ({"n0": 101}, "n0=101"),
    ({"alpha": 0.0}, "alpha=0.0"), ({"alpha": 1.5}, "alpha=1.5"), ({"batch_size": 0}, "batch_size=0"),
])
def test_certify_rejects_bad_arguments_naming_them(kwargs, named):
    smooth = Smooth(constant(0, 2), num_classes=2, sigma=0.25)
    args = {"n0": 10, "n": 100, "alpha": 0.001, "batch_size": 10} | kwargs
    with pytest.raises(ValueError, match=named):
        smooth.certify(torch.zeros(2), **args, generator=_gen())


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"n": 0}, "n=0"), ({"alpha": 0.0}, "alpha=0.0"), ({"batch_size": 0}, "batch_size=0"),
])
def test_predict_rejects_bad_arguments_naming_them(kwargs, named):
    smooth = Smooth(constant(0, 2), num_classes=2, sigma=0.25)
    with pytest.raises(ValueError, match=named):
        args = {"n": 100, "alpha": 0.001, "batch_size": 10} | kwargs
        smooth.predict(torch.zeros(2), **args, generator=_gen())


@pytest.mark.parametrize(("sigma", "num_classes", "named"), [(0.0, 10, "sigma=0.0"), (-0.5, 10, "sigma=-0.5"),
                                                             (0.25, 1, "num_classes=1")])
def test_smooth_rejects_bad_construction(sigma, num_classes, named):
    with pytest.raises(ValueError, match=named):
        Smooth(constant(0), num_classes=num_classes, sigma=sigma)


def test_wrong_classifier_output_is_a_clear_error():
    with pytest.raises(ValueError, match="logits"):
        smooth = Smooth(constant(0, 5), num_classes=10, sigma=0.25)
        smooth.predict(torch.zeros(2), 10, 0.1, 10, generator=_gen())
    with pytest.raises(ValueError, match="outside"):
        Smooth(lambda z: torch.full((z.shape[0],), 10), num_classes=10, sigma=0.25,
               labels_only=True).predict(torch.zeros(2), 10, 0.1, 10, generator=_gen())
