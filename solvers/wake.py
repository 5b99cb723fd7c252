"""The Solver-in-the-Loop wake flow (Um et al., NeurIPS 2020) in PhiFlow 3 with its NumPy backend.

Incompressible Navier–Stokes in a 100 × 200 (x × y) box; a disc of radius 10 at (50, 50); the flow
enters along +y with speed 1 through a band y < 5; zero-gradient (open) boundaries elsewhere;
dt = 1. One step, in float64:

    v ← diffuse(v, ν = D·U / Re)              explicit, sub-stepped for stability (D = 20, U = 1)
    v ← v·(1 − m_in) + m_in·(0, 1)             inflow band
    v ← semi-Lagrangian self-advection
    v ← make_incompressible(v, disc)           CG, tolerance 1e-5
    v ← v·(1 − m_disc)                         no-slip: faces inside the disc are zero

The last line is our addition: PhiFlow's obstacle handling alone only blocks the normal flow, and a
free-slip disc sheds no vortices. The Reynolds number is a per-sample condition.

State: the staggered velocity as one flat vector per sample, the x-faces ((nx+1)·ny values,
x-major) followed by the y-faces (nx·(ny+1) values); :meth:`split`/:meth:`join` convert.
Batched along the first axis (PhiFlow batch dimension), so one call solves all samples' pressure
systems together. Reference resolution 128×256, source 32×64; :func:`downsample_faces` maps one to
the other by block-averaging faces (a coarse face is the mean of the fine faces it covers).
"""
from __future__ import annotations

import math

import numpy as np

from solvers.protocol import SolverBase, SolverError

DOMAIN = (100.0, 200.0)
DISC_CENTER, DISC_RADIUS = (50.0, 50.0), 10.0
INFLOW_BAND = 5.0


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
        from phi.flow import Box, Obstacle, Solve, Sphere, StaggeredGrid, extrapolation

        nx, ny = (int(r) for r in resolution)
        if nx < 4 or ny < 4 or dt <= 0 or min_re <= 0:
            raise ValueError(f"need resolution >= 4×4, dt > 0, min_re > 0; got {resolution}, {dt}, {min_re}")
        self.nx, self.ny, self.dt, self.min_re = nx, ny, dt, min_re
        self.dx = DOMAIN[0] / nx
        self.nx_faces, self.ny_faces = (nx + 1) * ny, nx * (ny + 1)
        self.state_shape = (self.nx_faces + self.ny_faces,)
        self.dtype = np.dtype(np.float64)
        nu_max = 2 * DISC_RADIUS / min_re
        self.substeps = max(1, math.ceil(nu_max * dt / (0.2 * self.dx ** 2)))
        with pm.precision(64):
            bounds = Box(x=DOMAIN[0], y=DOMAIN[1])
            grid = dict(x=nx, y=ny, bounds=bounds)
            disc = Sphere(x=DISC_CENTER[0], y=DISC_CENTER[1], radius=DISC_RADIUS)
            self._proto = StaggeredGrid(0, extrapolation.BOUNDARY, **grid)
            band = Box(x=(-10 * DOMAIN[0], 10 * DOMAIN[0]), y=(-10 * DOMAIN[1], INFLOW_BAND))
            self._inflow = StaggeredGrid(band, extrapolation.BOUNDARY, **grid)
            self._disc_mask = StaggeredGrid(disc, extrapolation.BOUNDARY, **grid)
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
            nu = pm.tensor(2 * DISC_RADIUS / re, batch("b"))
            v = diffuse.explicit(v, nu, self.dt, substeps=self.substeps)
            v = v * (1 - self._inflow) + self._inflow * (0, 1)
            v = advect.semi_lagrangian(v, v, self.dt)
            try:
                v, _ = fluid.make_incompressible(v, [self._obstacle], self._solve)
            except Exception as exc:  # phiml raises its own ConvergenceException etc.
                raise SolverError(f"wake: pressure solve failed: {str(exc).splitlines()[0][:200]}") from None
            v = v * (1 - self._disc_mask)
            out_x = v.values[{"~vector": "x"}].numpy("b,x,y")
            out_y = v.values[{"~vector": "y"}].numpy("b,x,y")
        return self.join(out_x, out_y)

    def default_conditions(self, batch: int) -> dict[str, np.ndarray]:
        """Reynolds numbers spread over the test range of Um et al. (146.5 … 2343.8)."""
        return {"re": np.geomspace(146.5, 2343.8, batch)}

    def initial_state(self, batch: int, seed: int = 0) -> np.ndarray:
        """Uniform flow (0, 1) plus a small lateral bump behind the disc that seeds the shedding.

        The bump's sign and strength are drawn from ``seed``; without any asymmetry the discrete
        flow stays mirror-symmetric and the wake would not start shedding for a long time.
        """
        rng = np.random.default_rng(seed)
        (X, Y), _ = self.face_centers()
        bump = np.exp(-((X - DISC_CENTER[0]) ** 2 / 50.0 + (Y - DISC_CENTER[1] - 25.0) ** 2 / 100.0))
        amp = rng.choice([-1.0, 1.0], size=(batch, 1, 1)) * rng.uniform(0.3, 0.6, size=(batch, 1, 1))
        vx = amp * bump[None]
        vy = np.ones((batch, self.nx, self.ny + 1))
        return self.join(vx, vy)
