"""Input-space ZO with the chain rule (ZO-AE-DS, Zhang et al., ICLR 2022).

For a model  x → W(x; θ) = z → B(z) → loss  whose stage B is query-only, estimate
∂ℓ/∂z by finite differences in z (dimension d, much smaller than |θ|), then push it through
the white-box stage W with autograd:  ∂ℓ/∂θ = (∂z/∂θ)ᵀ ĝ_z.

Each sample's loss depends on its own z only, so one perturbation of coordinate j is applied to
every sample at once: CGE costs (d + 1)·B black-box queries (2d·B + B central), RGE (q + 1)·B.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from core.estimators.precision import ieee_float32

METHODS = ("cge", "rge")


def input_space_backward(per_sample_loss: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *,
                         method: str = "cge", mu: float = 5e-3, q: int = 192, central: bool = False,
                         chunk: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimate ∂ mean(ℓ)/∂z through a black box and backpropagate it into z's graph.

    Args:
        per_sample_loss: black-box part, ``z [B, ...] -> losses [B]`` (no autograd needed).
        z: output of the white-box stage (part of an autograd graph).
        method: ``"cge"`` (coordinate-wise) or ``"rge"`` (q Gaussian directions per sample).
        chunk: perturbations sent to the black box per call (as one batch of chunk·B samples).
    Returns:
        the unperturbed mean loss (detached). The gradients land in the white-box parameters' ``.grad``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not mu > 0:
        raise ValueError(f"mu must be > 0; got {mu}")
    zd = z.detach()
    B, shape = zd.shape[0], zd.shape[1:]
    flat = zd.reshape(B, -1)                                                   # [B, d]
    d = flat.shape[1]

    def losses(batch: torch.Tensor) -> torch.Tensor:                          # [K, B, d] -> [K, B]
        K = batch.shape[0]
        with torch.no_grad(), ieee_float32():                                  # no TF32 in the differences
            out = per_sample_loss(batch.reshape(K * B, *shape))
        return out.reshape(K, B).to(torch.float64)

    l0 = losses(flat.unsqueeze(0))[0]                                          # [B]
    grad = torch.zeros(B, d, dtype=torch.float64, device=zd.device)
    if method == "cge":
        eye = torch.eye(d, dtype=zd.dtype, device=zd.device)
        for s in range(0, d, chunk):
            e = eye[s:s + chunk].unsqueeze(1)                                  # [K, 1, d]
            plus = losses(flat.unsqueeze(0) + mu * e)
            diff = (plus - losses(flat.unsqueeze(0) - mu * e)) / (2 * mu) if central else (plus - l0) / mu
            grad[:, s:s + chunk] = diff.T
    else:
        for s in range(0, q, chunk):
            k = min(chunk, q - s)
            u = torch.randn(k, B, d, generator=generator, dtype=zd.dtype, device=zd.device)
            coef = (losses(flat.unsqueeze(0) + mu * u) - l0) / mu             # [k, B]
            grad += torch.einsum("kb,kbd->bd", coef, u.to(torch.float64))
        grad /= q
    z.backward((grad / B).to(z.dtype).reshape_as(z))
    return l0.mean().to(z.dtype)
