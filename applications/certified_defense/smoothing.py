"""Randomized smoothing: the CERTIFY and PREDICT procedures of Cohen, Rosenfeld & Kolter (2019).

J. Cohen, E. Rosenfeld, J. Z. Kolter, "Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019, https://arxiv.org/abs/1902.02918. The code mirrors the paper's pseudocode (its
Algorithm "certify and predict"); local names follow its notation (``n0``, ``n``, ``alpha``,
``sigma``, ``cAHat``, ``nA``, ``pABar``) so it reads with the paper open beside it.

Given a base classifier f, the smoothed classifier is

    g(x) = argmax_c P[f(x + ε) = c],   ε ~ N(0, σ² I),

and if the top class has probability p_A ≥ pABar > 1/2 then g is constant on the ℓ2 ball of radius
σ·Φ⁻¹(pABar) around x (Cohen et al., Theorem 1, with p_B ≤ 1 − p_A). f is only ever queried: it may be
a black box (here: a query-only classifier behind a trained denoiser). Noise is added in [0, 1]
pixel space; any normalisation belongs inside f.

Deviations from locuslab/smoothing/code/core.py: SciPy's ``binom_test`` was removed (SciPy 1.12), so
PREDICT uses ``scipy.stats.binomtest``; the device and dtype come from the input instead of ``'cuda'``;
the only randomness is an explicit ``torch.Generator``; n0 > n is refused (the selection sample is
meant to be the small one).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor

ABSTAIN = -1
"""The sentinel returned instead of a class when the test cannot decide."""


def lower_confidence_bound(nA: int, n: int, alpha: float) -> float:
    """One-sided (1 − alpha) Clopper–Pearson lower bound on p from nA successes in n Bernoulli(p) trials.

    pABar = B(alpha; nA, n − nA + 1), the alpha-quantile of a Beta distribution: the smallest p for
    which observing nA or more successes still has probability ≥ alpha. 0 when nA = 0; alpha^(1/n)
    when nA = n.

    :param nA: number of successes, 0 ≤ nA ≤ n
    :param n: number of trials, n ≥ 1
    :param alpha: failure probability, in (0, 1)
    :return: pABar with P[p ≥ pABar] ≥ 1 − alpha over the draw of the n trials
    """
    if n < 1:
        raise ValueError(f"need n >= 1; got n={n}")
    if not 0 <= nA <= n:
        raise ValueError(f"need 0 <= nA <= n; got nA={nA}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"need alpha in (0, 1); got alpha={alpha}")
    if nA == 0:
        return 0.0
    return float(beta.ppf(alpha, nA, n - nA + 1))


class Smooth:
    """A smoothed classifier g around a base classifier f that is only queried.

    :param classifier: f. Takes a batch ``[N, *x.shape]`` (images: ``[N, C, H, W]`` in [0, 1] pixel
        space) and returns logits ``[N, num_classes]``, or labels ``[N]`` when ``labels_only``.
        Called without autograd, with at most ``batch_size`` inputs per call.
    :param num_classes: number of classes, ≥ 2
    :param sigma: noise level σ > 0 (standard deviation of ε, in pixel units)
    :param labels_only: the classifier returns class indices instead of logits (a hard-label API)
    """

    ABSTAIN = ABSTAIN

    def __init__(self, classifier: Callable[[Tensor], Tensor], num_classes: int, sigma: float, *,
                 labels_only: bool = False) -> None:
        if num_classes < 2:
            raise ValueError(f"need num_classes >= 2; got num_classes={num_classes}")
        if not sigma > 0:
            raise ValueError(f"need sigma > 0; got sigma={sigma}")
        self.base_classifier = classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.labels_only = bool(labels_only)

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                generator: torch.Generator) -> tuple[int, float]:
        """CERTIFY: a prediction of g(x) and an ℓ2 radius within which g is robust.

        With probability at least 1 − alpha over the noise, if the returned class is not ABSTAIN then
        g(x + δ) equals it for every ‖δ‖₂ < radius: it never returns a class ≠ g(x) with probability
        more than alpha.

        :param x: the input ``[C, H, W]`` (any single-example shape; no batch dimension)
        :param n0: number of noisy samples used to select the top class cAHat
        :param n: number of fresh noisy samples used to estimate a lower bound on p_A
        :param alpha: failure probability
        :param batch_size: most inputs passed to the classifier in one call
        :param generator: the only source of randomness; on ``x.device``
        :return: ``(prediction, radius)``: (cAHat, σ·Φ⁻¹(pABar)), or ``(ABSTAIN, 0.0)`` when pABar < 1/2
        """
        self._check(n=n, alpha=alpha, batch_size=batch_size, n0=n0)
        # selection: guess the top class from n0 samples
        counts_selection = self._sample_noise(x, n0, batch_size, generator)
        cAHat = int(counts_selection.argmax())
        # estimation: count cAHat in n FRESH samples (reusing the selection would bias nA upwards)
        counts_estimation = self._sample_noise(x, n, batch_size, generator)
        nA = int(counts_estimation[cAHat])
        pABar = lower_confidence_bound(nA, n, alpha)
        if pABar < 0.5:
            return ABSTAIN, 0.0
        radius = self.sigma * float(norm.ppf(pABar))
        return cAHat, radius

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int, *, generator: torch.Generator) -> int:
        """PREDICT: evaluate g(x) with a two-sided binomial test between the top two classes.

        Returns a class ≠ g(x) with probability at most alpha (Hung & Fithian 2019,
        "Rank verification for exponential families", https://arxiv.org/abs/1610.03944); abstains
        when the top two counts are too close to tell apart.

        :param x: the input ``[C, H, W]`` (any single-example shape; no batch dimension)
        :param n: number of noisy samples
        :param alpha: failure probability
        :param batch_size: most inputs passed to the classifier in one call
        :param generator: the only source of randomness; on ``x.device``
        :return: the predicted class, or ``ABSTAIN`` when binomtest(nA, nA + nB, 1/2) has p-value > alpha
        """
        self._check(n=n, alpha=alpha, batch_size=batch_size)
        counts = self._sample_noise(x, n, batch_size, generator)
        top2 = np.argsort(-counts, kind="stable")[:2]   # ties go to the lower class index, like argmax
        nA, nB = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(nA, nA + nB, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    def _sample_noise(self, x: Tensor, num: int, batch_size: int, generator: torch.Generator) -> np.ndarray:
        """Classify ``num`` noisy copies x + ε, ε ~ N(0, σ² I), in batches of at most ``batch_size``.

        :return: counts ``[num_classes]`` (int64): how often f returned each class
        """
        counts = np.zeros(self.num_classes, dtype=np.int64)
        remaining = num
        with torch.no_grad():
            while remaining > 0:
                this_batch = min(batch_size, remaining)
                remaining -= this_batch
                noise = torch.randn((this_batch, *x.shape), generator=generator, dtype=x.dtype,
                                    device=x.device)
                predictions = self._classify(x.unsqueeze(0) + self.sigma * noise)
                counts += torch.bincount(predictions, minlength=self.num_classes).cpu().numpy()
        return counts

    def _classify(self, batch: Tensor) -> Tensor:
        """f's class indices ``[N]`` for a batch ``[N, *x.shape]``, checking the classifier's output."""
        out = self.base_classifier(batch)
        N = batch.shape[0]
        if self.labels_only:
            if tuple(out.shape) != (N,):
                raise ValueError(f"labels_only classifier must return labels [N]={N}; "
                                 f"got shape {tuple(out.shape)}")
            labels = out.long()
        else:
            if tuple(out.shape) != (N, self.num_classes):
                raise ValueError(f"classifier must return logits [N, num_classes]=[{N}, {self.num_classes}]; "
                                 f"got shape {tuple(out.shape)} (pass labels_only=True for a label API)")
            labels = out.argmax(dim=1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"classifier returned labels outside [0, {self.num_classes}): "
                             f"min {int(labels.min())}, max {int(labels.max())}")
        return labels

    @staticmethod
    def _check(*, n: int, alpha: float, batch_size: int, n0: int | None = None) -> None:
        if n0 is not None and n0 < 1:
            raise ValueError(f"need n0 >= 1; got n0={n0}")
        if n < 1:
            raise ValueError(f"need n >= 1; got n={n}")
        if n0 is not None and n0 > n:
            raise ValueError(f"need n0 <= n (n0 selects the class, n estimates p_A); got n0={n0}, n={n}")
        if not 0 < alpha < 1:
            raise ValueError(f"need alpha in (0, 1); got alpha={alpha}")
        if batch_size < 1:
            raise ValueError(f"need batch_size >= 1; got batch_size={batch_size}")
