"""Training a solver-in-the-loop corrector (Um et al. 2020) on the shared loop, in every mode.

The corrector N (a :class:`core.models.FieldCorrector` of a few hundred to a few thousand
parameters, zero-initialised so training starts from the coarse solver alone) is added to the state
after every source-solver step. Modes (``train.mode``, see :mod:`applications.pde_correction.config`):
``non`` regresses N(S(r_t)) on r_{t+1} − S(r_t) from pre-computed pairs; ``unrolled-net`` unrolls m
steps with the solver's outputs as constants; ``fo-sol`` backpropagates through a differentiable
twin of the solver; ``zo-sol`` (DeepZero, Chen et al. 2024) estimates the gradient through the
black-box solver with CGE / RGE / MeZO, every perturbed parameter set of a call advanced in one
batched solver call per time step. ``train.unroll`` is a curriculum on m.

``queries`` counts solver sample-steps spent on training (ZO: the estimator's declared count).
A failing solver ends the run in one line with the last epoch's checkpoint kept.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from applications.pde_correction.config import PDEConfig
from applications.pde_correction.data import PDEData, family_for, generate, open_solver
from applications.pde_correction.rollout import (SolverFailed, Window, differentiable_twin, residual_scale,
                                                 rollout_errors, sample_windows, scales, solver_step,
                                                 unrolled_loss, zo_objective)
from core.runtime.errors import TrainingDiverged
from core.runtime.experiment import Experiment
from core.runtime.seeding import seed_everything


def condition_planes(family, cond: dict[str, np.ndarray]) -> torch.Tensor:
    return family.cond_planes({k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in cond.items()})


def build_corrector(cfg: PDEConfig, family, in_scale: list[float], out_scale: list[float]):
    from core.models import build_model

    m = cfg.model
    return build_model("corrector", field_channels=family.field_channels, cond_channels=family.cond_channels,
                       width=m.width, depth=m.depth, kernel_size=m.kernel_size, dims=family.dims,
                       padding_mode=family.padding_mode, in_scale=in_scale, out_scale=out_scale).double()


class Problem:
    """The data, family, source solver and conditioning planes one run trains and evaluates on."""

    def __init__(self, cfg: PDEConfig, data: PDEData | None = None, *, progress: bool = True) -> None:
        self.data = data or generate(cfg, progress=progress)
        self.family = family_for(cfg, tuple(self.data.manifest["fine_shape"]))
        self.solver = open_solver(cfg.solver.source, cfg.solver.source_options, cfg.solver.timeout)
        shape = tuple(self.solver.state_shape)
        if shape != tuple(self.data.train.frames.shape[2:]):
            self.solver.close()
            raise ValueError(f"the source solver's state has shape {shape}, but the data's source frames have "
                             f"{tuple(self.data.train.frames.shape[2:])}: check solver.factor and source_options")
        self.train_planes = condition_planes(self.family, self.data.train.conditions)
        self.test_planes = condition_planes(self.family, self.data.test.conditions)

    def test_subset(self, sims: int):
        n = len(self.data.test) if not sims else min(sims, len(self.data.test))
        t = self.data.test
        return t.frames[:n], {k: v[:n] for k, v in t.conditions.items()}, self.test_planes[:n]

    def close(self) -> None:
        self.solver.close()


class PDEExperiment(Experiment):
    """One corrector training run (one mode) through one source solver."""

    app = "pde"
    plot_metric = "mae"
    stop_errors = (SolverFailed,)

    def __init__(self, cfg: PDEConfig, *, resume: dict[str, Any] | None = None, problem: Problem | None = None,
                 progress: bool = True) -> None:
        from core.models import from_spec, model_spec
        from core.runtime.blocks import make_estimator, make_optimizer, sparsity_ratios
        from core.sparsity import SparsityPlan

        super().__init__(cfg, resume=resume)
        if cfg.train.mode == "src":
            raise ValueError("train.mode=src is the solver alone: nothing to train; evaluate it with "
                             "'deepzero pde evaluate src'")
        seed_everything(cfg.run.seed)
        self.twin = differentiable_twin(cfg.solver.source, cfg.solver.source_options) \
            if cfg.train.mode == "fo-sol" else None
        self.problem = problem or Problem(cfg, progress=progress)
        self.family, self.solver = self.problem.family, self.problem.solver
        train = self.problem.data.train
        if resume is not None:
            saved_epochs = resume["config"]["optim"]["epochs"]
            if len(cfg.unroll) > 1 and saved_epochs != cfg.optim.epochs:
                raise ValueError(f"--resume cannot change optim.epochs ({saved_epochs} -> {cfg.optim.epochs}) under the "
                                 f"curriculum train.unroll={cfg.train.unroll}: its phases are fixed by the epochs")
            self.model = from_spec(resume["model_spec"]).double()
        else:
            in_scale, _ = scales(train.frames, self.family, self.problem.train_planes)
            try:
                out_scale = residual_scale(self.solver, self.family, train.frames, train.conditions,
                                           seed=cfg.run.seed)
            except SolverFailed as exc:
                raise ValueError(f"the source solver failed during set-up: {exc}") from None
            self.model = build_corrector(cfg, self.family, in_scale, out_scale)
        self.model_spec = model_spec(self.model)
        self.optimizer, self.scheduler = make_optimizer(cfg.optim, self.model.parameters(), cfg.train.steps_per_epoch,
                                                        kind=cfg.train.optimizer)
        try:
            self.pairs = self._pairs() if cfg.train.mode == "non" else None
        except SolverFailed as exc:
            raise ValueError(f"the source solver failed during set-up: {exc}") from None
        if cfg.method != "fo":
            self.ratios = resume.get("ratios") if resume is not None else \
                sparsity_ratios(cfg.zo, self.model, None, None, None, seed=cfg.run.seed)
            if self.ratios:
                self.plan = SparsityPlan(self.model, self.ratios,
                                         refresh_every=cfg.zo.refresh_epochs * cfg.train.steps_per_epoch,
                                         seed=cfg.run.seed + 3)
            self.estimator = make_estimator(cfg.zo, cfg.method, self.model, plan=self.plan, seed=cfg.run.seed)

    def _pairs(self) -> torch.Tensor:
        """non: S(r_t) for every training frame but the last, in one batched solver pass (counted)."""
        f = self.problem.data.train.frames
        S, T1 = f.shape[:2]
        cond = {k: np.repeat(v, T1 - 1, axis=0) for k, v in self.problem.data.train.conditions.items()}
        out = solver_step(self.solver, torch.from_numpy(f[:, :-1].reshape(S * (T1 - 1), -1)), cond)
        self.fo_queries += S * (T1 - 1)
        return out.reshape(S, T1 - 1, *f.shape[2:])

    def _solver(self, fn, when: str | None = None):
        try:
            return fn()
        except SolverFailed as exc:
            raise SolverFailed(f"solver failed {when or f'at step {self.step + 1}'}: {exc}") from None

    # -- the loop's parts ------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.cfg.train.steps_per_epoch

    def batches(self, epoch: int):
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch)
        m = 1 if cfg.train.mode == "non" else cfg.phase_unroll(epoch)
        train = self.problem.data.train
        for _ in range(cfg.train.steps_per_epoch):
            yield sample_windows(train.frames, train.conditions, self.problem.train_planes, m, cfg.train.batch_size,
                                 gen)

    def train_step(self, w: Window) -> dict[str, float]:
        mode, B, m = self.cfg.train.mode, w.batch, w.unroll
        if mode == "zo-sol":
            loss = self._solver(lambda: self.optimize(zo_objective(self.solver, self.family, w)))
            return {"loss": loss, "unroll": float(m)}
        self.optimizer.zero_grad(set_to_none=True)
        if mode == "non":
            a = self._pair_inputs(w)
            loss = ((a + self.family.from_field(self.model(self.family.net_input(a, w.planes))) - w.targets[:, 0])
                    ** 2).mean()
        else:
            loss = self._solver(lambda: unrolled_loss(self.model, self.solver, self.family, w, twin=self.twin))
            self.fo_queries += B * m
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged (loss {float(loss)}) at step {self.step}: lower optim.lr")
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()), "unroll": float(m)}

    def _pair_inputs(self, w: Window) -> torch.Tensor:
        """S(r_t) of the window's start frames, looked up in the pre-computed pairs."""
        sim, t = w.index
        return self.pairs[torch.from_numpy(sim), torch.from_numpy(t)]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        frames, cond, planes = self.problem.test_subset(cfg.evaluate.sims)
        horizon = cfg.evaluate.every or cfg.evaluate.horizon
        errors, _ = self._solver(lambda: rollout_errors(self.model, self.solver, self.family, frames, cond, planes,
                                                        horizon), f"in the evaluation after epoch {self.epoch + 1}")
        return summarize_errors(errors)

    # -- identity ----------------------------------------------------------------------------------------
    def run_name(self) -> str:
        cfg = self.cfg
        method = f"-{cfg.method}" if cfg.train.mode == "zo-sol" else ""
        return f"{cfg.train.mode}{method}-m{cfg.train.unroll.replace(',', '.')}"

    def summary(self) -> str:
        cfg = self.cfg
        params = sum(p.numel() for p in self.model.parameters())
        return (f"{cfg.train.mode}{' (' + cfg.method + ')' if cfg.train.mode == 'zo-sol' else ''}: a {params}-"
                f"parameter corrector on {cfg.solver.family} through '{cfg.solver.source}', unroll "
                f"{cfg.train.unroll} over {cfg.optim.epochs} epochs")

    def tags(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"mode": cfg.train.mode, "family": cfg.solver.family, "solver": cfg.solver.source,
                "needs_differentiable_solver": "yes" if cfg.train.mode == "fo-sol" else "no",
                "data": str(self.problem.data.path)}


def summarize_errors(errors: np.ndarray) -> dict[str, float]:
    """MAE over simulations and steps, its standard error over simulations, and at the last step."""
    per_sim = errors.mean(axis=1)
    sem = float(per_sim.std(ddof=1) / np.sqrt(len(per_sim))) if len(per_sim) > 1 else 0.0
    return {"mae": float(per_sim.mean()), "mae_sem": sem, "mae_final": float(errors[:, -1].mean())}
