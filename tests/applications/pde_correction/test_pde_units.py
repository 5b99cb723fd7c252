"""PDE correction: the rollout objectives, the differentiable twin, scaling, data generation and the wake setup."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from applications.pde_correction.config import PDEConfig
from applications.pde_correction.families import BurgersFamily, WakeFamily
from applications.pde_correction.rollout import (TorchBurgers, Window, rollout_errors, unrolled_loss,
                                                 zo_objective)
from applications.pde_correction.train import build_corrector
from solvers.burgers import Burgers


def _window(solver, fam, B=3, m=3, seed=0):
    rng = np.random.default_rng(seed)
    start = torch.from_numpy(rng.standard_normal((B, 16)) * 0.5)
    forcing = rng.standard_normal((B, 16)) * 0.2
    targets, s = [], start.numpy()
    for _ in range(m):
        s = solver.step(s, forcing=forcing) + 0.01
        targets.append(s)
    planes = fam.cond_planes({"forcing": torch.from_numpy(forcing)})
    return Window(start, torch.from_numpy(np.stack(targets, 1)), {"forcing": forcing}, planes)


def _corrector(fam, seed=0):
    torch.manual_seed(seed)
    net = build_corrector(PDEConfig(), fam, [0.5, 0.2], [0.01])
    for p in net.parameters():                         # leave the zero start: every layer matters
        torch.nn.init.normal_(p, std=0.3)
    return net


def test_torch_twin_equals_the_numpy_solver():
    opts = dict(n=32, nu=0.01, dt=0.05, umax=3.0)
    b, t = Burgers(**opts), TorchBurgers(**opts)
    rng = np.random.default_rng(1)
    u, f = rng.standard_normal((4, 32)), rng.standard_normal((4, 32)) * 0.3
    ref, mine = u, torch.from_numpy(u)
    for _ in range(20):
        ref, mine = b.step(ref, forcing=f), t.step(mine, torch.from_numpy(f))
    assert np.abs(mine.numpy() - ref).max() < 1e-12


def test_batched_zo_objective_equals_one_set_at_a_time():
    solver, fam = Burgers(16, nu=0.01, dt=0.05, umax=3.0), BurgersFamily(4, (16,))
    net, w = _corrector(fam), _window(solver, fam)
    obj = zo_objective(solver, fam, w)
    names = [n for n, _ in net.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    sets = {n: torch.stack([p.detach() + 1e-2 * k * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                            for k in range(4)]) for n, p in net.named_parameters()}
    together = obj(net, sets)
    alone = [obj(net, {n: sets[n][k:k + 1] for n in names})[0] for k in range(4)]
    assert together.shape == (4,)
    assert torch.allclose(together, torch.stack(alone), rtol=1e-12, atol=0)
    # row 0 is the model's own loss under autograd-free evaluation, as unrolled_loss computes it
    with torch.no_grad():
        plain = unrolled_loss(net, solver, fam, w)
    for n, p in net.named_parameters():
        sets[n][0] = p.detach()
    assert torch.allclose(obj(net, {n: sets[n][:1] for n in names})[0], plain,
                          rtol=1e-12)


def test_zo_gradient_through_the_black_box_matches_backprop_through_the_twin():
    """Central CGE through the NumPy solver ≈ autograd through the torch twin (fo-sol's gradient)."""
    from core import CGE

    opts = dict(n=16, nu=0.01, dt=0.05, umax=3.0)
    solver, twin, fam = Burgers(**opts), TorchBurgers(**opts), BurgersFamily(4, (16,))
    net, w = _corrector(fam, seed=3), _window(solver, fam, B=2, m=3, seed=4)
    net.zero_grad()
    unrolled_loss(net, solver, fam, w, twin=twin).backward()
    fo = torch.cat([p.grad.flatten() for p in net.parameters()])
    zo = CGE(net, mu=1e-5, central=True, objective_batch=40)
    zo.backward(zo_objective(solver, fam, w))
    est = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.linalg.norm(est - fo) / torch.linalg.norm(fo) < 1e-6
    # unrolled-net drops the solver's Jacobian: a different (truncated) gradient, so the two must differ
    net.zero_grad()
    unrolled_loss(net, solver, fam, w).backward()
    trunc = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.linalg.norm(trunc - fo) / torch.linalg.norm(fo) > 1e-3


def test_rollout_errors_of_the_solver_alone_are_its_distance_to_the_frames():
    solver, fam = Burgers(16, nu=0.01, dt=0.05, umax=3.0), BurgersFamily(4, (16,))
    rng = np.random.default_rng(2)
    frames = rng.standard_normal((2, 6, 16))
    forcing = np.zeros((2, 16))
    errors, kept = rollout_errors(None, solver, fam, frames, {"forcing": forcing},
                                  fam.cond_planes({"forcing": torch.from_numpy(forcing)}), 5, keep=6)
    s = frames[:, 0]
    for t in range(1, 6):
        s = solver.step(s, forcing=forcing)
        assert np.allclose(errors[:, t - 1], np.abs(s - frames[:, t]).mean(1), rtol=1e-14)
    assert len(kept) == 6 and np.array_equal(kept[-1], s[0])


def test_wake_family_round_trips_a_correction_onto_the_staggered_faces():
    fam = WakeFamily(4, ((32 + 1) * 64 + 32 * 65,))
    corr = torch.randn(2, 2, 32, 64, dtype=torch.float64)
    flat = fam.from_field(corr)
    assert flat.shape == (2, 33 * 64 + 32 * 65)
    back = fam.to_field(flat)
    assert torch.equal(back, corr)                          # cropped faces carry the correction exactly
    vx, vy = fam._split(flat, 32, 64)
    assert vx[:, -1].abs().max() == 0 and vy[:, :, -1].abs().max() == 0


def test_corrector_scales_are_fixed_buffers_and_the_start_is_no_correction():
    fam = BurgersFamily(4, (16,))
    net = build_corrector(PDEConfig(), fam, [2.0, 4.0], [0.5])
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in net.named_parameters() if "scale" not in n]
    assert torch.equal(net.in_scale.flatten(), torch.tensor([2.0, 4.0], dtype=torch.float64))
    x = torch.randn(3, 2, 16, dtype=torch.float64)
    assert net(x).abs().max() == 0                          # zero-initialised last conv
    from core.models import from_spec, model_spec

    again = from_spec(model_spec(net), net.state_dict()).double()
    assert torch.equal(again.out_scale, net.out_scale)


class _Dying:
    """A reference solver for the generation test: Burgers that raises on its N-th call (once)."""

    def __init__(self, crash_at: int | None, **options):
        self.inner, self.crash_at, self.calls = Burgers(**options), crash_at, 0
        self.state_shape, self.dtype = self.inner.state_shape, self.inner.dtype

    def step(self, state, **conditions):
        from solvers.protocol import SolverError

        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise SolverError("dying: simulated crash")
        return self.inner.step(state, **conditions)

    def close(self):
        pass


def test_generation_killed_midway_continues_to_the_same_data(tmp_path, monkeypatch):
    import solvers
    from applications.pde_correction import data as pdata

    opts = dict(n=32, nu=0.01, dt=0.05, umax=3.0)
    cfg = PDEConfig()
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, reference="test:dying",
                                                              reference_options=opts),
                              data=dataclasses.replace(cfg.data, dir=str(tmp_path / "a"), train_sims=3, test_sims=2,
                                                       spinup=5, steps=12, batch=2))
    crash = {"at": 9}
    solvers.register("test:dying", lambda **o: _Dying(crash["at"], **o))
    with pytest.raises(ValueError, match="reference solver failed at step 9 of simulations 1-2"):
        pdata.generate(cfg, progress=False)
    other_seed = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=1))
    with pytest.raises(ValueError, match="settings differ: seed"):   # the manifest guards the partial data
        pdata.generate(other_seed, progress=False)
    crash["at"] = 30                                        # dies again later: in the second batch
    with pytest.raises(ValueError, match="failed at step"):
        pdata.generate(cfg, progress=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch=3))   # resumed with another batch size
    crash["at"] = None
    resumed = pdata.generate(cfg, progress=False)
    clean_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(tmp_path / "b")))
    clean = pdata.generate(clean_cfg, progress=False)
    for split in ("train", "test"):
        a, b = getattr(resumed, split), getattr(clean, split)
        assert np.array_equal(a.frames, b.frames) and a.frames.shape == (len(b), 13, 8)
        assert all(np.array_equal(a.conditions[k], b.conditions[k]) for k in b.conditions)
    assert resumed.manifest["complete"] and resumed.manifest["factor"] == 4
    # frames are block averages of the reference: frame 0 is the down-sampled state after the spin-up
    fam = BurgersFamily(4, (8,))
    ref = Burgers(**opts)
    start = fam.initial_states((32,), 3, cfg.run.seed * 1000)
    forcing = fam.conditions("train", 3, cfg.run.seed, (32,))["forcing"]
    s = start
    for _ in range(5):
        s = ref.step(s, forcing=forcing)
    assert np.allclose(clean.train.frames[:, 0], s.reshape(3, 8, 4).mean(2), rtol=0, atol=1e-15)
    # a different dataset in the same directory is refused, naming what differs
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, steps=20))
    with pytest.raises(ValueError, match="settings differ: steps"):
        pdata.generate(other, progress=False)


def test_curriculum_splits_epochs_over_the_unroll_lengths():
    cfg = PDEConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, unroll="1,4,16"),
                              optim=dataclasses.replace(cfg.optim, epochs=6))
    assert [cfg.phase_unroll(e) for e in range(6)] == [1, 1, 4, 4, 16, 16]


def test_a_diverging_corrector_is_reported_as_divergence_and_costs_only_its_own_row():
    from applications.pde_correction.evaluate import evaluate_models
    from core.runtime.errors import TrainingDiverged

    solver, fam = Burgers(16, nu=0.01, dt=0.05, umax=3.0), BurgersFamily(4, (16,))
    net = _corrector(fam)
    with torch.no_grad():
        net.net[-1].bias.fill_(float("inf"))                 # a blown-up corrector
    rng = np.random.default_rng(0)
    frames, forcing = rng.standard_normal((2, 4, 16)) * 0.3, np.zeros((2, 16))
    planes = fam.cond_planes({"forcing": torch.from_numpy(forcing)})
    with pytest.raises(TrainingDiverged, match="corrector diverged"):
        rollout_errors(net, solver, fam, frames, {"forcing": forcing}, planes, 3)

    class Part:                                            # the parts of a Problem evaluate_models reads
        def test_subset(self, sims):
            return frames, {"forcing": forcing}, planes

    part = Part()
    part.family, part.solver = fam, solver
    rows, errors, _ = evaluate_models(part, {"src": None, "bad": net}, horizon=3, progress=False)
    assert rows[0]["mode"] == "src" and np.isfinite(rows[0]["mae"]) and rows[0]["note"] == ""
    assert rows[1]["mode"] == "bad" and rows[1]["mae"] == float("inf") and "diverged" in rows[1]["note"]
    assert set(errors) == {"src"}


class _FailingUserSolver:
    """A user's in-process solver class (not built on solvers' base): fails on call ``at`` as told."""

    def __init__(self, how, at):
        self.inner, self.how, self.at, self.calls = Burgers(16, nu=0.01, dt=0.05, umax=3.0), how, at, 0

    def step(self, state, **cond):
        self.calls += 1
        out = self.inner.step(state, **cond)
        if self.calls >= self.at:
            if self.how == "raise":
                raise ValueError("mesh exploded\nsecond line")
            if self.how == "nan":
                out = out.copy()
                out[0, 3] = np.nan
            if self.how == "shape":
                out = out[:, :8]
        return out


@pytest.mark.parametrize("how,expected", [("raise", "ValueError: mesh exploded"), ("nan", "1 NaN/Inf values"),
                                          ("shape", "returned shape")])
def test_an_in_process_solver_failing_mid_zo_step_is_one_line_and_leaves_the_weights(how, expected):
    """Any exception, NaN or wrong shape from a user's class: SolverFailed (one line), not divergence,
    and the ZO step that was under way leaves every parameter bit-identical."""
    from applications.pde_correction.rollout import SolverFailed
    from core import CGE

    fam = BurgersFamily(4, (16,))
    net = _corrector(fam)
    w = _window(Burgers(16, nu=0.01, dt=0.05, umax=3.0), fam)
    solver = _FailingUserSolver(how, at=2)                   # the second time step of the first unroll fails
    before = {k: v.clone() for k, v in net.state_dict().items()}
    zo = CGE(net, mu=1e-3, objective_batch=8)
    with pytest.raises(SolverFailed) as info:
        zo.backward(zo_objective(solver, fam, w))
    assert expected in str(info.value) and "\n" not in str(info.value)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
