import numpy as np
import pytest

from solvers import SolverError, load
from solvers.burgers import Burgers, downsample
from solvers.wake import WakeFlow, downsample_faces


def test_burgers_conserves_mass_without_forcing():
    b = Burgers(64, nu=0.02)
    u = b.initial_state(8, seed=1) + 0.3
    mass0 = u.sum(axis=1) * b.dx
    for _ in range(50):
        u = b.step(u)
    assert np.allclose(u.sum(axis=1) * b.dx, mass0, rtol=0, atol=1e-12)
    assert not np.allclose(u, b.initial_state(8, seed=1) + 0.3)


def test_burgers_forcing_adds_its_integral():
    b = Burgers(32, nu=0.0, dt=0.01)
    u = np.zeros((2, 32))
    f = np.ones((2, 32)) * 0.5
    out = b.step(u, forcing=f)
    assert np.allclose(out.sum(axis=1) * b.dx, 0.5 * 0.01 * b.length)


def test_coarse_error_shrinks_with_resolution():
    ref = Burgers(512, nu=0.05, dt=0.02)
    u_ref = ref.initial_state(4, seed=3)
    states = {n: downsample(u_ref, 512 // n) for n in (16, 32, 64, 128)}
    solvers = {n: Burgers(n, nu=0.05, dt=0.02) for n in states}
    for _ in range(50):
        u_ref = ref.step(u_ref)
        states = {n: solvers[n].step(s) for n, s in states.items()}
    errors = [np.abs(states[n] - downsample(u_ref, 512 // n)).mean() for n in (16, 32, 64, 128)]
    assert all(a > 1.5 * b for a, b in zip(errors, errors[1:])), errors


def test_solvers_reject_autograd_tensors_and_bad_shapes():
    import torch

    b = load("burgers", n=8)
    with pytest.raises(SolverError, match="requires grad"):
        b.step(torch.zeros(2, 8, requires_grad=True))
    with pytest.raises(SolverError, match=r"expects state of shape \(B, 8\)"):
        b.step(np.zeros((2, 9)))
    assert b.step(torch.zeros(2, 8, dtype=torch.float64)).shape == (2, 8)
    with pytest.raises(SolverError, match="unknown solver 'nope'"):
        load("nope")


def test_wake_downsampling_is_a_block_average_of_faces():
    fine = WakeFlow((8, 16))
    rng = np.random.default_rng(0)
    state = rng.standard_normal((2, *fine.state_shape))
    vx, vy = fine.split(state)
    cx, cy = downsample_faces(vx, vy, 4)
    assert cx.shape == (2, 3, 4) and cy.shape == (2, 2, 5)
    # coarse x-face (i=1, j=2) sits on fine x-face 4 and covers fine cells 8..11 in y
    assert np.isclose(cx[1, 1, 2], (vx[1, 4, 8] + vx[1, 4, 9] + vx[1, 4, 10] + vx[1, 4, 11]) / 4)
    # coarse y-face (i=1, j=3) sits on fine y-face 12 and covers fine cells 4..7 in x
    assert np.isclose(cy[0, 1, 3], vy[0, 4:8, 12].mean())
    assert np.array_equal(fine.join(vx, vy), state)


def test_wake_step_of_a_sample_does_not_depend_on_its_batch():
    """Batched ZO advances many perturbed states in one call: each must get exactly its own step."""
    w = WakeFlow((16, 32))
    rng = np.random.default_rng(0)
    s = w.initial_state(3) + 0.1 * rng.standard_normal((3, *w.state_shape))
    re = np.array([120.0, 500.0, 3000.0])
    together = w.step(s, re=re)
    for i in range(3):
        assert w.step(s[i:i + 1], re=re[i:i + 1]).tobytes() == together[i:i + 1].tobytes(), i
    assert w.step(s, re=re).tobytes() == together.tobytes()                      # deterministic


def test_wake_follows_um_et_al_setup():
    from solvers.wake import strouhal, viscosity

    assert viscosity(97.65625) == pytest.approx(1e4 / (1e4 * 2 ** 4))            # their re = 1638.4 · Re
    assert viscosity(100.0) == pytest.approx(6.1035 / 100, rel=1e-4)                   # ν ≈ 6.10 / Re
    w = WakeFlow((32, 64))
    m = w.inflow_mask                                                             # on the y-faces, (nx, ny + 1)
    assert m[:, :2].all() and m[0].all() and m[-1].all() and m[1:-1, 2:].sum() == 0
    vx, vy = w.split(w.initial_state(1))
    assert (vy == 1).all() and vx.sum() == 4 * 10 and vx[0, 14:18, 42:52].min() == 1.0   # the sideways poke
    # the flow leaves faces inside the disc at zero without any extra masking (make_incompressible does it)
    out = w.step(w.initial_state(1), re=np.array([200.0]))
    ox, _ = w.split(out)
    (X, Y), _ = w.face_centers()
    inside = (X - 50) ** 2 + (Y - 50) ** 2 < 8.0 ** 2
    assert np.abs(ox[0][inside]).max() < 1e-12
    t = np.arange(600)
    assert strouhal(np.sin(2 * np.pi * 0.0101 * t)) == pytest.approx(0.0101 * 20, rel=0.01)


@pytest.mark.parametrize("n", [16, 128, 1024, 4096])
@pytest.mark.parametrize("nu", [0.0, 0.01, 0.3])
def test_burgers_substeps_respect_the_combined_stability_bound(n, nu):
    """SSP-RK2 with Rusanov flux + central diffusion needs h·(2a/dx + 4ν/dx²) ≤ 2 (a = umax): both terms."""
    b = Burgers(n, nu=nu)
    assert b.h * (2 * b.umax / b.dx + 4 * nu / b.dx ** 2) <= 2 * 0.8 + 1e-12
    assert b.h * b.umax / b.dx <= 0.5 + 1e-12 and b.h * b.substeps == pytest.approx(b.dt)


def test_burgers_fine_grid_stays_bounded_by_its_initial_maximum():
    """At n = 1024 the separate advection/diffusion limits gave NaN within 40 steps for this sine.

    Invariant: under the bound each Euler stage is monotone, so max |u| never grows without forcing.
    """
    b = Burgers(1024)
    u = 1.9 * np.sin(2 * np.pi * b.x / b.length)[None]
    peak0, peak = np.abs(u).max(), 0.0
    for _ in range(200):
        u = b.step(u)
        peak = max(peak, np.abs(u).max())
    assert np.isfinite(u).all() and peak <= peak0 + 1e-12
    assert np.abs(u).max() < 0.5 * peak0                     # the shock has formed and dissipated
