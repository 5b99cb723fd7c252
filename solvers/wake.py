"""The Solver-in-the-Loop wake flow (Um et al., NeurIPS 2020) in PhiFlow 3 with its NumPy backend.

Incompressible Navier–Stokes in a 100 × 200 (x × y) box with open (zero-gradient) boundaries; a disc
of diameter D = 20 at (50, 50); the flow runs along +y at U = 1; dt = 1. One step, in float64, in
Um et al.'s order:

    v   ← diffuse(v, ν)                       explicit, sub-stepped for stability
    v_y ← v_y·(1 − M) + M                     inflow: v_y = 1 on the mask M
    v   ← semi-Lagrangian self-advection
    v   ← make_incompressible(v, disc)        CG, tolerance 1e-5; faces inside the disc become 0

The inflow mask M covers the first two rows of y-faces and the first and last columns of y-faces, as in
Um et al.; v_x is never forced. The Reynolds number Re is a per-sample condition with Um et al.'s
mapping: their code diffuses by dt·res²/re in cell units with re = 1638.4·Re, which in domain units is
ν = 10⁴/re = 10⁴/(1638.4·Re) ≈ 6.10/Re at every resolution (so their labels Re = 97.7 … 3125 for
training and 146.5 … 2343.8 for testing are these Re, not U·D/ν).

State: the staggered velocity as one flat vector per sample, the x-faces ((nx+1)·ny values,
x-major) followed by the y-faces (nx·(ny+1) values); :meth:`split`/:meth:`join` convert.
Batched along the first axis (PhiFlow batch dimension), so one call solves all samples' pressure
systems together; the diffusion sub-steps are fixed by ``min_re``, so a sample's step never depends on
the rest of its batch. Reference resolution 128×256, source 32×64; :func:`downsample_faces` maps one
to the other by block-averaging faces (a coarse face is the mean of the fine faces it covers).
"""
from __future__ import annotations

import math

import numpy as np

from solvers.protocol import SolverBase, SolverError

DOMAIN = (100.0, 200.0)
DISC_CENTER, DISC_RADIUS = (50.0, 50.0), 10.0
RE_SCALE = 1638.4                  # Um et al.'s code parameter re = RE_SCALE · Re (the paper's label)


def viscosity(re: np.ndarray | float) -> np.ndarray | float:
    """ν in domain units for Reynolds label Re: 10⁴ / (1638.4 · Re) (Um et al.'s diffusion)."""
    return 1e4 / (RE_SCALE * np.asarray(re, dtype=np.float64))


def strouhal(signal: np.ndarray, dt: float = 1.0, length: float = 2 * DISC_RADIUS, speed: float = 1.0) -> float:
    """Strouhal number f·D/U of the dominant frequency of a probe's time series (mean removed, Hann window)."""
    x = np.asarray(signal, dtype=np.float64)
    x = (x - x.mean()) * np.hanning(len(x))
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), dt)
    k = int(np.argmax(power[1:])) + 1
    if 0 < k < len(power) - 1:                 # parabolic interpolation of the peak on log power
        a, b, c = np.log(power[k - 1:k + 2] + 1e-300)
        shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
    else:
        shift = 0.0
    return float((k + shift) * (freqs[1] - freqs[0]) * length / speed)


def downsample_faces(vx: np.ndarray, vy: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-average staggered faces: vx (B, nx+1, ny), vy (B, nx, ny+1) -> coarser by ``factor``.

    A coarse x-face at x = i·Δx_c coincides with fine x-face factor·i and spans fine cells
    factor·j … factor·j + factor − 1 in y: its value is their mean (likewise for y-faces).
    """
    B, nxp1, ny = vx.shape
    nx = nxp1 - 1
    if nx % factor or ny % factor:
        raise SolverError(f"cannot downsample {nx}×{ny} by {factor}")
    cx = vx[:, ::factor, :].reshape(B, nx // factor + 1, ny // factor, factor).mean(axis=3)
    cy = vy[:, :, ::factor].reshape(B, nx // factor, factor, ny // factor + 1).mean(axis=2)
    return cx, cy


class WakeFlow(SolverBase):
    """Batched PhiFlow wake-flow stepper.

    Args:
        resolution: (nx, ny) cells; (32, 64) is the source, (128, 256) the reference.
        dt: time step.
        min_re: smallest Reynolds number supported; fixes the diffusion sub-steps, so a sample's
            result never depends on the rest of its batch.
        cg_tol: relative/absolute tolerance of the pressure solve.
    Conditions:
        re: Reynolds number per sample, shape (B,).
    """

    name = "wake"
    conditions = ("re",)

    def __init__(self, resolution: tuple[int, int] = (32, 64), *, dt: float = 1.0, min_re: float = 90.0,
                 cg_tol: float = 1e-5) -> None:
        from phi import math as pm
        from phi.flow import Box, Obstacle, Solve, Sphere, StaggeredGrid, dual, extrapolation, spatial

        nx, ny = (int(r) for r in resolution)
        if nx < 4 or ny < 4 or dt <= 0 or min_re <= 0:
            raise ValueError(f"need resolution >= 4×4, dt > 0, min_re > 0; got {resolution}, {dt}, {min_re}")
        self.nx, self.ny, self.dt, self.min_re = nx, ny, dt, min_re
        self.dx = DOMAIN[0] / nx
        self.nx_faces, self.ny_faces = (nx + 1) * ny, nx * (ny + 1)
        self.state_shape = (self.nx_faces + self.ny_faces,)
        self.dtype = np.dtype(np.float64)
        self.substeps = max(1, math.ceil(float(viscosity(min_re)) * dt / (0.2 * self.dx ** 2)))
        with pm.precision(64):
            bounds = Box(x=DOMAIN[0], y=DOMAIN[1])
            grid = dict(x=nx, y=ny, bounds=bounds)
            disc = Sphere(x=DISC_CENTER[0], y=DISC_CENTER[1], radius=DISC_RADIUS)
            self._proto = StaggeredGrid(0, extrapolation.BOUNDARY, **grid)
            my = np.zeros((nx, ny + 1))
            my[:, :2] = 1.0                                   # the first two rows of y-faces
            my[0, :] = my[-1, :] = 1.0                        # the first and last columns of y-faces
            self.inflow_mask = my
            self._mask = pm.stack([pm.tensor(np.zeros((nx + 1, ny)), spatial("x,y")),
                                   pm.tensor(my, spatial("x,y"))], dual(vector="x,y"))
        self._obstacle = Obstacle(disc)
        self._solve = Solve("CG", cg_tol, cg_tol, max_iterations=2000)

    # -- layout ------------------------------------------------------------------------------
    def split(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, n) -> vx (B, nx+1, ny), vy (B, nx, ny+1)."""
        B = state.shape[0]
        return (state[:, :self.nx_faces].reshape(B, self.nx + 1, self.ny),
                state[:, self.nx_faces:].reshape(B, self.nx, self.ny + 1))

    @staticmethod
    def join(vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
        B = vx.shape[0]
        return np.ascontiguousarray(np.concatenate([vx.reshape(B, -1), vy.reshape(B, -1)], axis=1))

    def face_centers(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Coordinates (X, Y) of the x-faces and of the y-faces."""
        d = self.dx
        xf = np.meshgrid(np.arange(self.nx + 1) * d, (np.arange(self.ny) + 0.5) * d, indexing="ij")
        yf = np.meshgrid((np.arange(self.nx) + 0.5) * d, np.arange(self.ny + 1) * d, indexing="ij")
        return (xf[0], xf[1]), (yf[0], yf[1])

    # -- physics -----------------------------------------------------------------------------
    def _step(self, state: np.ndarray, re: np.ndarray | None = None, **unknown) -> np.ndarray:
        from phi import math as pm
        from phi.flow import advect, batch, diffuse, dual, fluid, spatial

        if unknown:
            raise SolverError(f"wake: unknown condition(s) {', '.join(unknown)}; allowed: re")
        if re is None:
            raise SolverError("wake: condition 're' (Reynolds number per sample) is required")
        if (re < self.min_re).any():
            raise SolverError(f"wake: re must be >= min_re = {self.min_re} (got {re.min():.4g}); "
                              "construct WakeFlow(min_re=...) lower")
        vx, vy = self.split(state)
        with pm.precision(64):
            values = pm.stack([pm.tensor(vx, batch("b"), spatial("x,y")), pm.tensor(vy, batch("b"), spatial("x,y"))],
                              dual(vector="x,y"))
            v = self._proto.with_values(values)
            nu = pm.tensor(viscosity(re), batch("b"))
            v = diffuse.explicit(v, nu, self.dt, substeps=self.substeps)
            v = v.with_values(v.values * (1 - self._mask) + self._mask)     # v_y = 1 on the mask; v_x untouched
            v = advect.semi_lagrangian(v, v, self.dt)
            try:
                v, _ = fluid.make_incompressible(v, [self._obstacle], self._solve)
            except Exception as exc:  # phiml raises its own ConvergenceException etc.
                raise SolverError(f"wake: pressure solve failed: {str(exc).splitlines()[0][:200]}") from None
            out_x = v.values[{"~vector": "x"}].numpy("b,x,y")
            out_y = v.values[{"~vector": "y"}].numpy("b,x,y")
        return self.join(out_x, out_y)

    def default_conditions(self, batch: int) -> dict[str, np.ndarray]:
        """Reynolds numbers spread over the test range of Um et al. (146.5 … 2343.8)."""
        return {"re": np.geomspace(146.5, 2343.8, batch)}

    def initial_state(self, batch: int, seed: int = 0) -> np.ndarray:
        """Um et al.'s start (:func:`initial_velocity`); deterministic, ``seed`` is unused."""
        return initial_velocity(self.nx, self.ny, batch)


def initial_velocity(nx: int, ny: int, batch: int) -> np.ndarray:
    """Um et al.'s start as a flat staggered state: v_y = 1 everywhere, and a sideways poke v_x = 1
    on the x-faces 10–19 cells above the middle row and within 2 cells of the middle column, which
    breaks the mirror symmetry so that the wake starts shedding."""
    vx = np.zeros((batch, nx + 1, ny))
    vx[:, nx // 2 - 2:nx // 2 + 2, ny // 2 + 10:ny // 2 + 20] = 1.0
    vy = np.ones((batch, nx, ny + 1))
    return WakeFlow.join(vx, vy)
