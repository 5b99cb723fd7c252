"""White-box comparator: deterministic verification (auto-LiRPA) next to empirical robustness (PGD).

Randomized smoothing certifies a query-only classifier probabilistically. With white-box access the
same network can be verified deterministically: a sample (x, y) is **verified** at radius ε when a
sound lower bound of every logit margin m_j(x') = z_y(x') − z_j(x'), j ≠ y, is positive for all x' in
the ball B_p(x, ε) (∩ [0, 1] where auto-LiRPA can take it). It is **PGD-robust** when projected
gradient descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR, arXiv:1706.06083) finds no misclassified point in the ball ∩ [0, 1]. Per sample,
verified ⇒ PGD-robust ⇒ clean-correct, so the accuracies satisfy verified ≤ PGD ≤ clean;
:func:`verify_report` checks this per sample (a violation means an unsound bound: a bug).

Bounds (Xu et al. 2020, auto-LiRPA, NeurIPS, arXiv:2002.12920), on the margins through the
specification matrix C (row j = e_y − e_j):
- ``IBP``: interval bound propagation (Gowal et al. 2018), cheapest, loosest;
- ``CROWN``: backward linear relaxation (Zhang et al. 2018, NeurIPS, arXiv:1811.00866);
- ``alpha-CROWN``: CROWN with the lower ReLU slopes optimised by gradient ascent (Xu et al. 2021,
  ICLR, arXiv:2011.13824); never looser than CROWN (auto-LiRPA keeps the best iterate).

Input set: pixels in [0, 1]. ℓ∞: the box [x − ε, x + ε] ∩ [0, 1] (auto-LiRPA's ``x_L``/``x_U``).
ℓ2: auto-LiRPA 0.3 ignores ``x_L``/``x_U`` for ℓ2, so the ball is **not** clipped to [0, 1]; that is
a superset of what PGD searches, hence conservative (sound, possibly looser).

What auto-LiRPA 0.3 cannot do here, and what this module does instead (:func:`prepare_for_lirpa`
and :func:`_bounded_module`); every item was hit on ``small_cnn``/``DnCNN`` models:
1. :class:`core.models.Normalize` before a conv fails CROWN in the default ``conv_mode='patches'``
   (``BoundDiv`` → ``_multiply_by_const`` asserts the patches have no padding; ``matrix`` mode works
   but is ~10–50× slower). Replaced by the identical per-channel affine map, a depthwise 1×1
   ``Conv2d`` with weight 1/std and bias −mean/std.
2. ℓ2 **IBP is unsound** in 0.3 when the perturbed input feeds anything but a Linear/Conv (ReLU, the
   skip ``x − R(x)`` of DnCNN): the input interval is [x, x] and the ℓ2 radius is dropped (measured:
   a lower bound 0.73 above the exact minimum 0.08). For ℓ2 an identity depthwise 1×1 conv is put in
   front of the model whenever some consumer of the input is not a Linear/Conv; its ℓ2 IBP gives the
   pixel box [x − ε, x + ε] ⊇ ball, which every later node then propagates soundly. CROWN is
   unaffected (the identity is linear, so the bound is the same).
3. alpha-CROWN through ``MaxPool2d`` fails in 0.3 (patches mode: a shape mismatch in
   ``BoundMaxPool.jit_mutiply``; matrix mode: ``torch.empty`` given a nested size). MaxPool is taken
   off the optimised activations, so it keeps its CROWN relaxation and only the ReLU slopes are
   optimised (still a sound alpha-CROWN bound, not looser than CROWN).
4. ``sparse_intermediate_bounds`` (auto-LiRPA's default) skips the intermediate bounds of neurons that
   IBP calls stable; MaxPool's relaxation uses the bounds of all its inputs, so this loosens CROWN
   (measured) and trips an assertion in alpha-CROWN. It is turned off, and so is
   ``sparse_features_alpha`` (alpha only for unstable neurons), whose reconstruction hits a shape
   mismatch in ℓ2 alpha-CROWN; alpha is shared per conv channel (``use_full_conv_alpha=False``),
   which keeps alpha-CROWN affordable on one core.
5. alpha-CROWN on a model with no optimisable activation (e.g. one Linear layer) crashes in 0.3
   (``backward`` on a loss without a graph); there it is computed as CROWN, which it equals.
6. A denoiser alone (image-shaped output, no C) fails CROWN at the root ``BoundSub``
   (``broadcast_backward`` assertion). Never needed: we always bound the classifier's margins with C.
Works as-is: Conv2d, Linear, BatchNorm2d in eval mode (running statistics; the model is put in eval
mode), ReLU, MaxPool2d (IBP/CROWN), AdaptiveAvgPool2d(1) (traced as a global average pool), Flatten,
DnCNN's residual subtraction. A layer auto-LiRPA cannot parse raises auto-LiRPA's own error.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from applications.certified_defense.lirpa_compat import import_auto_lirpa
from core.estimators.precision import ieee_float32
from core.models import Normalize

__all__ = ["METHODS", "NORMS", "margin_lower_bounds", "margin_spec", "pgd_accuracy", "pgd_attack",
           "prepare_for_lirpa", "verified_accuracy", "verify_report"]

NORMS = ("inf", "2")
METHODS = ("IBP", "CROWN", "alpha-CROWN")
_BOUND_OPTS = {"sparse_intermediate_bounds": False,     # item 4 of the module docstring
               "sparse_features_alpha": False,          # item 4 as well (shape mismatch with ℓ2)
               "use_full_conv_alpha": False}            # item 4: alpha shared per channel, far cheaper


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    return norm


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    return method


def _check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be finite and >= 0; got {eps}")
    if x.ndim < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need x [B, ...] and labels y [B]; got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"inputs must be pixels in [0, 1]; got range [{x.min().item():.4g}, "
                         f"{x.max().item():.4g}] (put the normalisation in the model, e.g. "
                         f"core.models.Normalize)")


# --------------------------------------------------------------------------- model preparation

def _affine_1x1(scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """Depthwise 1×1 conv computing ``scale_c · x + shift_c`` per channel c (exact, no padding)."""
    channels = scale.numel()
    conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
    with torch.no_grad():
        conv.weight.copy_(scale.reshape(channels, 1, 1, 1))
        conv.bias.copy_(shift.reshape(channels))
    return conv.to(scale.device).requires_grad_(False)


def _replace_normalize(module: nn.Module) -> nn.Module:
    if isinstance(module, Normalize):
        std, mean = module.std.reshape(-1), module.mean.reshape(-1)
        return _affine_1x1(1.0 / std, -mean / std)
    for name, child in module.named_children():
        setattr(module, name, _replace_normalize(child))
    return module


def prepare_for_lirpa(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode that auto-LiRPA 0.3 bounds (the original is untouched).

    Every :class:`core.models.Normalize` becomes the equivalent depthwise 1×1 conv (item 1 of the
    module docstring); outputs agree with ``model.eval()`` up to float rounding.
    """
    return _replace_normalize(copy.deepcopy(model)).eval()


class _InputIdentity(nn.Module):
    """Identity Linear/1×1-conv in front of a model, so ℓ2 IBP starts soundly (item 2)."""

    def __init__(self, model: nn.Module, input_shape: torch.Size, like: torch.Tensor) -> None:
        super().__init__()
        if len(input_shape) == 4:
            self.identity: nn.Module = _affine_1x1(torch.ones(input_shape[1], device=like.device),
                                                   torch.zeros(input_shape[1], device=like.device))
        elif len(input_shape) == 2:
            self.identity = nn.Linear(input_shape[1], input_shape[1]).to(like.device).requires_grad_(False)
            with torch.no_grad():
                self.identity.weight.copy_(torch.eye(input_shape[1]))
                self.identity.bias.zero_()
        else:
            raise ValueError(f"ℓ2 bounds need [B, C, H, W] or [B, D] inputs; got {tuple(input_shape)}")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.identity(x))


def _input_feeds_only_affine(bm: Any) -> bool:
    from auto_LiRPA.operators import BoundConv, BoundLinear
    root = bm[bm.input_name[0]]
    return all(isinstance(bm[name], (BoundConv, BoundLinear)) and bm[name].inputs[0] is root
               for name in root.output_name)


def _quiet() -> contextlib.AbstractContextManager:
    """auto-LiRPA prints progress (e.g. alpha-CROWN's early stop) to stdout; keep reports clean."""
    return contextlib.redirect_stdout(io.StringIO())


def _bounded_module(prepared: nn.Module, x: torch.Tensor, norm: str,
                    alpha_iterations: int) -> Any:
    lirpa = import_auto_lirpa()
    opts = dict(_BOUND_OPTS, optimize_bound_args={"iteration": alpha_iterations})
    with _quiet():
        bm = lirpa.BoundedModule(prepared, torch.zeros_like(x), bound_opts=copy.deepcopy(opts))
        if norm == "2" and not _input_feeds_only_affine(bm):
            bm = lirpa.BoundedModule(_InputIdentity(prepared, x.shape, x), torch.zeros_like(x),
                                     bound_opts=copy.deepcopy(opts))
    bm.eval()
    from auto_LiRPA.operators import BoundMaxPool     # item 3: keep MaxPool's CROWN relaxation
    bm.optimizable_activations = [n for n in bm.optimizable_activations if not isinstance(n, BoundMaxPool)]
    return bm


# --------------------------------------------------------------------------- verification

def margin_spec(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Specification C ``[B, K−1, K]``: row r of sample i is e_{y_i} − e_j for the r-th class j ≠ y_i.

    ``C @ logits`` are the margins z_y − z_j; the sample is verified when all their lower bounds are > 0.
    """
    eye = torch.eye(num_classes, device=y.device)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)                          # [B, K, K], row y is zero
    others = eye[y] == 0                                                # [B, K], True at j ≠ y
    return c[others].reshape(y.shape[0], num_classes - 1, num_classes)


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                        norm: str = "inf", method: str = "CROWN", alpha_iterations: int = 20,
                        batch_size: int = 64) -> torch.Tensor:
    """Sound lower bounds of z_y(x') − z_j(x') over the ε-ball, ``[B, K]`` (``+inf`` at j = y).

    :param model: classifier on ``[B, C, H, W]`` pixels in [0, 1] (normalisation inside the model).
    :param x: inputs ``[B, C, H, W]`` in [0, 1]; ``y``: labels ``[B]``.
    :param eps: radius; the ℓ∞ box is clipped to [0, 1], the ℓ2 ball is not (conservative).
    :param norm: ``"inf"`` or ``"2"``; ``method``: ``"IBP"``, ``"CROWN"`` or ``"alpha-CROWN"``.
    :param alpha_iterations: gradient steps of alpha-CROWN (auto-LiRPA's default 20).
    :param batch_size: samples bounded at once.
    """
    _check_norm(norm)
    _check_method(method)
    _check_inputs(x, y, eps)
    if alpha_iterations < 1 or batch_size < 1:
        raise ValueError(f"need alpha_iterations >= 1 and batch_size >= 1; got "
                         f"alpha_iterations={alpha_iterations}, batch_size={batch_size}")
    lirpa = import_auto_lirpa()
    prepared = prepare_for_lirpa(model)
    with torch.no_grad():
        num_classes = prepared(x[:1]).shape[-1]
    out = torch.full((x.shape[0], num_classes), math.inf, device=x.device, dtype=x.dtype)
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        bm = _bounded_module(prepared, xb, norm, alpha_iterations)
        if norm == "inf":
            ptb = lirpa.PerturbationLpNorm(eps=eps, norm=np.inf, x_L=(xb - eps).clamp(0, 1),
                                           x_U=(xb + eps).clamp(0, 1))
        else:
            ptb = lirpa.PerturbationLpNorm(eps=eps, norm=2)
        bx = lirpa.BoundedTensor(xb, ptb)
        spec = margin_spec(yb, num_classes).to(xb.dtype)
        lirpa_method = method
        if method == "alpha-CROWN" and not bm.optimizable_activations:
            lirpa_method = "CROWN"        # no ReLU slope to optimise: alpha-CROWN is CROWN (0.3 would crash)
        grad_ctx = torch.enable_grad() if lirpa_method == "alpha-CROWN" else torch.no_grad()
        with grad_ctx, _quiet():
            lower, _ = bm.compute_bounds(x=(bx,), C=spec, method=lirpa_method, bound_upper=False)
        others = torch.ones(yb.shape[0], num_classes, dtype=torch.bool, device=x.device)
        others[torch.arange(yb.shape[0], device=x.device), yb] = False
        block = out[start:start + batch_size]
        block[others] = lower.detach().reshape(-1).to(out.dtype)
    return out


def verified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                      norm: str = "inf", method: str = "CROWN", alpha_iterations: int = 20,
                      batch_size: int = 64) -> tuple[float, torch.Tensor]:
    """Fraction of samples whose every margin lower bound is > 0, and the bounds ``[B, K]``.

    A sample is verified when min_{j≠y} lower(z_y − z_j) > 0 over the ball (see
    :func:`margin_lower_bounds` for the arguments and the ball); the bound of j = y is ``+inf``.
    """
    margins = margin_lower_bounds(model, x, y, eps, norm=norm, method=method,
                                  alpha_iterations=alpha_iterations, batch_size=batch_size)
    verified = margins.min(dim=1).values > 0
    return verified.float().mean().item(), margins


# --------------------------------------------------------------------------- PGD

def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.ndim - 1)))


def _project(x: torch.Tensor, delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """δ into the ε-ball, then x + δ into [0, 1].

    ℓ∞: exact projection onto the ball ∩ [0, 1] (per coordinate). ℓ2: projection onto the ball, then
    clipping into [0, 1], which only shrinks |δ_i| (x ∈ [0, 1]), so the point stays feasible.
    """
    if norm == "inf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    if norm == "inf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:                                                # uniform in the ℓ2 ball
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
        d = x[0].numel()
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = direction * (eps * radius).reshape(-1, *([1] * (x.ndim - 1)))
    return _project(x, delta, eps, norm)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str,
               steps: int = 20, step_size: float | None = None, restarts: int = 1,
               generator: torch.Generator) -> torch.Tensor:
    """PGD on the cross-entropy (Madry et al. 2018); per sample, whether it was never misclassified.

    Every iterate of every restart (random start in the ball) is checked, and x itself too, so the
    result implies clean correctness. ℓ∞ steps are α·sign(∇), ℓ2 steps α·∇/‖∇‖₂; default
    α = 2.5·ε/steps (Madry et al.). Returns a bool tensor ``[B]`` (True = PGD-robust).
    """
    _check_norm(norm)
    _check_inputs(x, y, eps)
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1; got steps={steps}, restarts={restarts}")
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
    model = model.eval()
    with torch.no_grad():
        robust = model(x).argmax(dim=1) == y
    if eps == 0:
        return robust
    for _ in range(restarts):
        delta = _random_start(x, eps, norm, generator)
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                logits = model(x + delta)
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), delta)
            with torch.no_grad():
                robust &= logits.argmax(dim=1) == y
                step = grad.sign() if norm == "inf" else grad / _per_sample_norm(grad).clamp_min(1e-12)
                delta = _project(x, delta.detach() + alpha * step, eps, norm)
        with torch.no_grad():
            robust &= model(x + delta).argmax(dim=1) == y
    return robust


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str,
                 steps: int = 20, step_size: float | None = None, restarts: int = 1,
                 generator: torch.Generator) -> float:
    """Fraction of samples PGD does not misclassify (see :func:`pgd_attack`): an upper bound on robustness."""
    robust = pgd_attack(model, x, y, eps, norm=norm, steps=steps, step_size=step_size,
                        restarts=restarts, generator=generator)
    return robust.float().mean().item()


# --------------------------------------------------------------------------- report

def verify_report(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                  eps_list: Sequence[float], norms: Sequence[str] = ("inf",),
                  methods: Sequence[str] = ("IBP", "CROWN"), *, pgd_steps: int = 20,
                  pgd_restarts: int = 1, alpha_iterations: int = 20, seed: int = 0,
                  on_violation: str = "raise") -> list[dict[str, Any]]:
    """One row per (model, norm, ε, method): clean, PGD and verified accuracy, with a consistency check.

    Rows: ``{model, norm, eps, method, clean_accuracy, pgd_accuracy, verified_accuracy, consistent}``.
    Clean and PGD accuracy are computed once per (model, norm, ε); PGD is seeded with ``seed``.
    Every model is put in eval mode (BatchNorm uses its running statistics, as auto-LiRPA does).

    Consistency (checked per sample): verified ⇒ PGD-robust ⇒ correct. A verified sample that PGD
    breaks means an unsound bound, a bug (for ℓ2 the verified ball contains PGD's clipped one).
    ``on_violation="raise"`` raises ``RuntimeError`` naming the rows; ``"flag"`` sets
    ``consistent=False`` in the row instead.

    Every product runs in full float32 (:func:`core.estimators.precision.ieee_float32`): a GPU's
    default TF32 convolutions would make the bounds, and with them "verified", unsound.
    """
    if on_violation not in ("raise", "flag"):
        raise ValueError(f"on_violation must be 'raise' or 'flag'; got {on_violation!r}")
    with ieee_float32():
        return _verify_rows(models, x, y, eps_list, norms, methods, pgd_steps=pgd_steps,
                            pgd_restarts=pgd_restarts, alpha_iterations=alpha_iterations, seed=seed,
                            on_violation=on_violation)


def _verify_rows(models, x, y, eps_list, norms, methods, *, pgd_steps, pgd_restarts, alpha_iterations, seed,
                 on_violation) -> list[dict[str, Any]]:
    """The body of :func:`verify_report`, run inside its full-precision block."""
    for n in norms:
        _check_norm(n)
    for m in methods:
        _check_method(m)
    rows: list[dict[str, Any]] = []
    for name, model in models.items():
        model = model.eval()
        with torch.no_grad():
            correct = model(x).argmax(dim=1) == y
        for norm in norms:
            for eps in eps_list:
                generator = torch.Generator(device=x.device).manual_seed(seed)
                robust = pgd_attack(model, x, y, eps, norm=norm, steps=pgd_steps, restarts=pgd_restarts,
                                    generator=generator)
                for method in methods:
                    _, margins = verified_accuracy(model, x, y, eps, norm=norm, method=method,
                                                   alpha_iterations=alpha_iterations)
                    verified = margins.min(dim=1).values > 0
                    bad = int((verified & ~robust).sum()) + int((robust & ~correct).sum())
                    row = {"model": name, "norm": norm, "eps": float(eps), "method": method,
                           "clean_accuracy": correct.float().mean().item(),
                           "pgd_accuracy": robust.float().mean().item(),
                           "verified_accuracy": verified.float().mean().item(),
                           "consistent": bad == 0}
                    if bad and on_violation == "raise":
                        raise RuntimeError(
                            f"verified <= PGD-robust <= clean violated for {bad} sample(s) in row {row}: "
                            f"a verified sample was attacked, so a bound is unsound (a bug)")
                    rows.append(row)
    return rows
