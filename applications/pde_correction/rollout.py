"""Unrolled solver + corrector steps (solver-in-the-loop, Um et al. 2020), for every training mode.

One corrected step from state s with conditions c:  a = S(s; c),  s' = a + N([a, c]; θ).
A training window starts at a reference frame r_t and unrolls m steps; its loss is the mean over the
m steps of the mean squared difference to r_{t+1} … r_{t+m}.

- :func:`zo_objective` — a batched objective for the ZO estimators: K perturbed parameter sets are
  advanced together, so every time step is ONE solver call on K·B states (the solver stays a pure
  black box; ``queries`` counts B·m solver sample-steps per parameter set);
- :func:`unrolled_loss` — the same unroll for backprop: with ``twin`` (a differentiable copy of the
  solver) gradients flow through the solver (fo-sol); without, solver outputs are constants and
  gradients flow through the network calls only (unrolled-net);
- :func:`rollout_errors` — long evaluation rollouts, all simulations in one solver call per step.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from applications.pde_correction.families import Family
from core.collectives import RankLost
from solvers.protocol import SolverError


class SolverFailed(RuntimeError):
    """The black-box solver failed during training or evaluation (the run stops, checkpoint kept)."""


def solver_step(solver, state: torch.Tensor, cond: dict[str, np.ndarray]) -> torch.Tensor:
    """One black-box step of a batch of states (no autograd: the solver sees NumPy arrays).

    A non-finite state (a diverged corrector) raises :class:`TrainingDiverged` before the solver
    sees it, so a corrector's blow-up is never reported as the solver's failure.
    """
    if not torch.isfinite(state).all():
        from core.runtime.errors import TrainingDiverged

        raise TrainingDiverged("the corrected state became non-finite before a solver step (the corrector "
                               "diverged: lower optim.lr, or zo.mu)")
    arr = state.detach().cpu().numpy()
    try:
        out = solver.step(arr, **cond)
    except SolverError as exc:
        raise SolverFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    except RankLost:                             # another rank stopped this one (SIGTERM): not the solver
        raise
    except Exception as exc:                     # a user's in-process solver class: any error is its failure
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SolverFailed(f"{type(exc).__name__}{': ' + first if first else ''}") from None
    out = np.asarray(out)
    if out.shape != tuple(state.shape):          # checked here too: an in-process class may not check itself
        raise SolverFailed(f"the solver returned shape {out.shape}; expected {tuple(state.shape)}")
    if not np.isfinite(out).all():
        raise SolverFailed(f"the solver returned {int((~np.isfinite(out)).sum())} NaN/Inf values")
    return torch.from_numpy(out).to(state.dtype)


def _repeat(cond: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    return {name: np.concatenate([v] * k, axis=0) for name, v in cond.items()}


class Window:
    """A batch of training windows: start states [B, n], targets [B, m, n], conditions."""

    def __init__(self, start: torch.Tensor, targets: torch.Tensor, cond: dict[str, np.ndarray],
                 planes: torch.Tensor, index: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.start, self.targets, self.cond, self.planes = start, targets, cond, planes
        self.index = index                                  # (simulation, start frame) of each window

    @property
    def batch(self) -> int:
        return self.start.shape[0]

    @property
    def unroll(self) -> int:
        return self.targets.shape[1]


def zo_objective(solver, family: Family, w: Window):
    """The window's unrolled loss as a batched objective ``fn(model, params) -> [K]`` (see module doc)."""
    from core import batched_objective, stacked_forward

    B, m = w.batch, w.unroll

    @batched_objective(queries=B * m)
    def rollout(model, params):
        K = len(next(iter(params.values())))
        s = w.start.repeat(K, 1)                                          # [K·B, n]
        cond = _repeat(w.cond, K)
        planes = w.planes.repeat(K, *([1] * (w.planes.dim() - 1)))
        loss = torch.zeros(K, dtype=w.start.dtype)
        for i in range(m):
            a = solver_step(solver, s, cond)                               # one call for all K·B states
            x = family.net_input(a, planes)
            corr = stacked_forward(model, params, x.reshape(K, B, *x.shape[1:]), per_set=True)
            s = a + family.from_field(corr.reshape(K * B, *corr.shape[2:]))
            loss += ((s - w.targets[:, i].repeat(K, 1)) ** 2).reshape(K, -1).mean(1)
        return loss / m

    return rollout


def unrolled_loss(model, solver, family: Family, w: Window, twin=None) -> torch.Tensor:
    """The window's unrolled loss with autograd through the net (and through ``twin`` when given)."""
    s, loss = w.start, w.start.new_zeros(())
    for i in range(w.unroll):
        if twin is not None:
            a = twin.step(s, **{k: torch.as_tensor(v) for k, v in w.cond.items()})
        else:
            a = solver_step(solver, s, w.cond)                             # a constant: no gradient
        s = a + family.from_field(model(family.net_input(a, w.planes)))
        loss = loss + ((s - w.targets[:, i]) ** 2).mean()
    return loss / w.unroll


@torch.no_grad()
def rollout_errors(model, solver, family: Family, frames: np.ndarray, cond: dict[str, np.ndarray],
                   planes: torch.Tensor, horizon: int, *, keep: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Roll every simulation ``horizon`` steps from its first frame (``model`` None = solver alone).

    Returns the MAE per simulation and step ``[S, horizon]`` against ``frames[:, 1:horizon + 1]``, and
    the states of simulation 0 at ``keep`` evenly spaced steps (for snapshots and the GIF).
    """
    s = torch.from_numpy(frames[:, 0]).to(torch.float64)
    errors = np.zeros((len(frames), horizon))
    marks = set(np.linspace(0, horizon, keep).round().astype(int).tolist()) if keep else set()
    kept = [s[0].numpy().copy()] if 0 in marks else []
    for t in range(1, horizon + 1):
        s = solver_step(solver, s, cond)
        if model is not None:
            s = s + family.from_field(model(family.net_input(s, planes)))
        if not torch.isfinite(s).all():
            from core.runtime.errors import TrainingDiverged

            raise TrainingDiverged(f"the corrected rollout became non-finite at step {t} of the evaluation "
                                   "(the corrector diverged: lower optim.lr)")
        errors[:, t - 1] = np.abs(s.numpy() - frames[:, t]).reshape(len(frames), -1).mean(1)
        if t in marks:
            kept.append(s[0].numpy().copy())
    return errors, kept


class TorchBurgers:
    """A differentiable twin of :class:`solvers.burgers.Burgers` in torch (same scheme, same sub-steps).

    Rusanov flux, centred diffusion, SSP-RK2 with the solver's sub-step count; equal to the NumPy
    solver to rounding, so fo-sol trains against the same discrete model ZO sees as a black box.
    """

    def __init__(self, **options: Any) -> None:
        from solvers.burgers import Burgers

        ref = Burgers(**options)
        self.n, self.dx, self.nu, self.h, self.substeps = ref.n, ref.dx, ref.nu, ref.h, ref.substeps

    def rhs(self, u: torch.Tensor, forcing: torch.Tensor | None) -> torch.Tensor:
        right = torch.roll(u, -1, dims=1)
        flux = 0.25 * (u * u + right * right) - 0.5 * torch.maximum(u.abs(), right.abs()) * (right - u)
        du = -(flux - torch.roll(flux, 1, dims=1)) / self.dx
        if self.nu:
            du = du + self.nu * (right - 2 * u + torch.roll(u, 1, dims=1)) / self.dx ** 2
        return du + forcing if forcing is not None else du

    def step(self, u: torch.Tensor, forcing: torch.Tensor | None = None) -> torch.Tensor:
        if forcing is not None:
            forcing = forcing.to(u)
        for _ in range(self.substeps):
            u1 = u + self.h * self.rhs(u, forcing)
            u = 0.5 * (u + u1 + self.h * self.rhs(u1, forcing))
        return u


def differentiable_twin(spec: str, options: dict[str, Any]):
    """A torch twin of the source solver, or ValueError when there is none (fo-sol needs one)."""
    if spec == "burgers":
        return TorchBurgers(**options)
    raise ValueError(f"train.mode=fo-sol backpropagates through the solver and needs a differentiable twin; "
                     f"there is one for the registered 'burgers' solver, not for '{spec}' (use zo-sol for a "
                     "black-box solver)")


def scales(frames: np.ndarray, family: Family, cond_planes: torch.Tensor) -> tuple[list[float], list[float]]:
    """Input scales (std of each field channel and conditioning channel over the training data)."""
    field = family.to_field(torch.from_numpy(frames.reshape(-1, *frames.shape[2:])))
    out = []
    for t in (field, cond_planes):
        for c in range(t.shape[1]):
            std = float(t[:, c].std())
            out.append(std if std > 1e-12 else max(float(t[:, c].abs().mean()), 1.0))
    return out, out[:family.field_channels]


def residual_scale(solver, family: Family, frames: np.ndarray, cond: dict[str, np.ndarray], *,
                   samples: int = 256, seed: int = 0) -> list[float]:
    """Std per field channel of r_{t+1} − S(r_t) over sampled training frames: the correction's size."""
    S, T = frames.shape[:2]
    rng = np.random.default_rng(seed)
    n = min(samples, S * (T - 1))
    pick = rng.choice(S * (T - 1), size=n, replace=False)
    sim, t = pick // (T - 1), pick % (T - 1)
    a = solver_step(solver, torch.from_numpy(frames[sim, t]), {k: v[sim] for k, v in cond.items()})
    res = family.to_field(torch.from_numpy(frames[sim, t + 1]) - a)
    return [max(float(res[:, c].std()), 1e-12) for c in range(res.shape[1])]


def window_count(T: int, m: int) -> int:
    return max(0, T - m)


def sample_windows(frames: np.ndarray, cond: dict[str, np.ndarray], planes: torch.Tensor, m: int, batch: int,
                   generator: torch.Generator) -> Window:
    """``batch`` random windows (simulation, start t) with t + m inside the kept frames."""
    S, T1 = frames.shape[:2]
    starts = T1 - m                                                      # t in [0, T1 - m)
    flat = torch.randint(0, S * starts, (batch,), generator=generator).numpy()
    sim, t = flat // starts, flat % starts
    start = torch.from_numpy(frames[sim, t])
    targets = torch.from_numpy(np.stack([frames[sim, t + i + 1] for i in range(m)], axis=1))
    return Window(start, targets, {k: v[sim] for k, v in cond.items()}, planes[torch.from_numpy(sim)], (sim, t))


def mean_and_sem(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
