"""1-D viscous Burgers' equation with forcing, finite volumes on a periodic domain.

    ∂u/∂t + ∂(u²/2)/∂x = ν ∂²u/∂x² + f(x)

Cell averages on N cells of [0, L); the convective flux is Rusanov's (local Lax–Friedrichs),
F_{i+½} = ½(u_i²/2 + u_{i+1}²/2) − ½ max(|u_i|, |u_{i+1}|)(u_{i+1} − u_i); diffusion is the
centred 3-point Laplacian; time integration is the two-stage SSP Runge–Kutta (Heun) with a fixed
number of sub-steps chosen at construction, so that a sample's result never depends on the rest of
its batch. The flux form conserves Σu·dx exactly without forcing.

Sub-step h: advection and diffusion act together, so their limits add. Linearised at speed a the
semi-discrete operator's eigenvalues reach −(2a/dx + 4ν/dx²) on the real axis, where SSP-RK2 needs
h·λ ≥ −2; the same bound h·(a/dx + 2ν/dx²) ≤ 1 makes each Euler stage monotone (no new extrema),
which SSP-RK2 inherits. So h ≤ SAFETY · 2 / (2a/dx + 4ν/dx²) with a = umax, and, for accuracy of
the advection, also h ≤ 0.5·dx/umax (CFL 0.5). Taking the smaller of the two separate limits
instead (as an earlier version did) let h·(2a/dx + 4ν/dx²) reach 2.6: at n = 1024 with the
defaults a sine of amplitude 1.9 blew up to NaN within 40 steps.

A coarse "source" solver and a fine "reference" one differ only in N; :func:`downsample` maps a
fine state to the coarse grid by averaging blocks of cells (conservative).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from solvers.protocol import SolverBase, SolverError

SAFETY = 0.8          # fraction of the combined SSP-RK2 stability bound used by a sub-step


def downsample(u: np.ndarray, factor: int) -> np.ndarray:
    """Block averages of ``factor`` consecutive cells: (B, N) -> (B, N / factor); preserves Σu·dx."""
    B, N = u.shape
    if N % factor:
        raise SolverError(f"cannot downsample {N} cells by {factor}")
    return u.reshape(B, N // factor, factor).mean(axis=2)


class Burgers(SolverBase):
    """Batched Burgers stepper.

    Args:
        n: number of cells.
        length: domain length L (periodic).
        nu: viscosity ν.
        dt: time step of one ``step`` call.
        umax: the largest |u| the sub-step count is sized for (CFL 0.5 and the combined advection +
            diffusion bound); a state exceeding it warns.
    Conditions:
        forcing: f sampled at cell centres, shape (B, n) (default 0).
    """

    name = "burgers"
    conditions = ("forcing",)

    def __init__(self, n: int = 32, *, length: float = 2 * math.pi, nu: float = 0.01, dt: float = 0.05,
                 umax: float = 2.0) -> None:
        if not isinstance(n, int) or not all(isinstance(v, (int, float)) for v in (length, nu, dt, umax)):
            raise ValueError(f"n must be an integer and length, nu, dt, umax numbers; got n={n!r}, length={length!r}, "
                             f"nu={nu!r}, dt={dt!r}, umax={umax!r}")
        if n < 4 or nu < 0 or dt <= 0 or umax <= 0:
            raise ValueError(f"need n >= 4, nu >= 0, dt > 0, umax > 0; got n={n}, nu={nu}, dt={dt}, umax={umax}")
        self.n, self.length, self.nu, self.dt, self.umax = n, length, nu, dt, umax
        self.dx = length / n
        cfl = 0.5 * self.dx / umax                                            # accuracy of the advection
        stable = SAFETY * 2.0 / (2.0 * umax / self.dx + 4.0 * nu / self.dx ** 2)   # SSP-RK2, both terms
        limit = min(cfl, stable)
        self.substeps = max(1, math.ceil(dt / limit))
        self.h = dt / self.substeps
        self.state_shape = (n,)
        self.dtype = np.dtype(np.float64)
        self.x = (np.arange(n) + 0.5) * self.dx

    def rhs(self, u: np.ndarray, forcing: np.ndarray | None) -> np.ndarray:
        right = np.roll(u, -1, axis=1)                          # u_{i+1}
        flux = 0.25 * (u * u + right * right) - 0.5 * np.maximum(np.abs(u), np.abs(right)) * (right - u)
        du = -(flux - np.roll(flux, 1, axis=1)) / self.dx       # -(F_{i+½} - F_{i-½}) / dx
        if self.nu:
            du += self.nu * (right - 2 * u + np.roll(u, 1, axis=1)) / self.dx ** 2
        if forcing is not None:
            du += forcing
        return du

    def _step(self, state: np.ndarray, forcing: np.ndarray | None = None, **unknown) -> np.ndarray:
        if unknown:
            raise SolverError(f"burgers: unknown condition(s) {', '.join(unknown)}; allowed: forcing")
        if forcing is not None and forcing.shape != state.shape:
            raise SolverError(f"burgers: forcing must have shape {state.shape}; got {forcing.shape}")
        peak = float(np.abs(state).max()) if state.size else 0.0
        if peak > self.umax:
            warnings.warn(f"burgers: |u| = {peak:.3g} exceeds umax = {self.umax}, which sizes the sub-steps "
                          "(CFL and stability); increase umax or lower dt", RuntimeWarning, stacklevel=3)
        u = state.copy()
        for _ in range(self.substeps):
            u1 = u + self.h * self.rhs(u, forcing)
            u = 0.5 * (u + u1 + self.h * self.rhs(u1, forcing))
        return u

    def initial_state(self, batch: int, seed: int = 0) -> np.ndarray:
        """Smooth random initial conditions: a few low Fourier modes with random phases."""
        rng = np.random.default_rng(seed)
        k = np.arange(1, 4)
        amp = rng.uniform(0.2, 0.6, (batch, 3, 1)) / k[None, :, None]
        phase = rng.uniform(0, 2 * np.pi, (batch, 3, 1))
        xs = 2 * np.pi * self.x[None, None, :] / self.length
        return (amp * np.sin(k[None, :, None] * xs + phase)).sum(axis=1)
