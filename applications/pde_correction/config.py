"""Typed config of ``deepzero pde`` (presets in ``presets/*.yaml``).

``train.mode`` picks how the corrector learns (Um et al. 2020's baselines plus the ZO one):

- ``src``: no corrector — the coarse solver alone (evaluation only);
- ``non``: supervised on pre-computed pairs (one solver step from the reference), backprop on the net;
- ``unrolled-net``: m unrolled solver+net steps, gradients through the net only (solver outputs are
  constants) — the honest first-order peer for a black-box solver;
- ``zo-sol``: ZO gradients through the m unrolled steps with the solver a pure black box
  (``optim.method`` = zo-cge | zo-rge | zo-mezo; the other modes take ``fo``);
- ``fo-sol``: backprop through the m unrolled steps with a differentiable twin of the solver (needs
  one: the torch Burgers here) — the upper bound.

``train.unroll`` is the curriculum on m: ``"1,4,16"`` splits the epochs into three equal phases.
``train.optimizer`` is Adam (as Um et al.) or SGD with ``optim.momentum``, either with ``optim``'s
warm-up and cosine schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.runtime.blocks import OptimConfig, RunConfig, ZOConfig, validate_blocks
from core.runtime.config import check_choice
from core.runtime.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
MODES = ("src", "non", "unrolled-net", "zo-sol", "fo-sol")
FAMILIES = ("burgers", "wake")
RESUME_SAFE = ("data.dir", "solver.timeout", "evaluate.sims", "evaluate.horizon", "evaluate.gif_frames")


@dataclass
class SolverConfig:
    family: str = "burgers"                # burgers | wake: the state layout and conditions
    source: str = "burgers"                # the coarse black box: name | pkg.mod:Class | exec:COMMAND | http://...
    source_options: dict[str, Any] = field(default_factory=dict)      # keyword arguments of a registered or
    #                                        importable solver (the presets set them); external ones take none
    reference: str = "burgers"             # the fine solver generating the data
    reference_options: dict[str, Any] = field(default_factory=dict)
    factor: int = 4                        # reference cells per source cell (block averages)
    timeout: float = 120.0                 # seconds per call of an external solver


@dataclass
class DataConfig:
    dir: str = ""                          # "" = runs/pde/data/<hash of the data settings>
    train_sims: int = 8                    # simulations (conditions) for training
    test_sims: int = 4                     # and for testing (disjoint conditions)
    spinup: int = 100                      # reference steps discarded at the start
    steps: int = 300                       # reference steps kept per simulation
    batch: int = 16                        # simulations advanced together by the reference solver


@dataclass
class CorrectorConfig:
    width: int = 8
    depth: int = 3
    kernel_size: int = 5


@dataclass
class TrainConfig:
    mode: str = "zo-sol"
    unroll: str = "1,4,8"                  # curriculum on m: epochs split evenly over these
    batch_size: int = 8                    # windows (start frames) per step
    steps_per_epoch: int = 20
    optimizer: str = "adam"                # adam | sgd (momentum optim.momentum)


@dataclass
class EvaluateConfig:
    horizon: int = 200                     # rollout steps from the first kept frame of each test simulation
    sims: int = 0                          # test simulations evaluated (0 = all)
    every: int = 0                         # per-epoch evaluation horizon (0 = evaluate.horizon)
    gif_frames: int = 60                   # frames of the rollout GIF (0 = no GIF)


@dataclass
class PDEConfig:
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: CorrectorConfig = field(default_factory=CorrectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    zo: ZOConfig = field(default_factory=lambda: ZOConfig(mu=1e-3, sparsity=0.0, q=16, objective_batch=64))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(method="zo-cge", lr=1e-3, momentum=0.9,
                                                                   weight_decay=0.0, epochs=6, warmup_epochs=0))
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        check_choice("solver.family", self.solver.family, FAMILIES)
        check_choice("train.mode", self.train.mode, MODES)
        check_choice("train.optimizer", self.train.optimizer, ("adam", "sgd"))
        validate_blocks(self, methods=("zo-cge", "zo-rge", "zo-mezo", "fo"))
        if _not_the_cpu(self.run.device):
            raise UserError(f"run.device={self.run.device}: the PDE app runs on the CPU (its solvers step "
                            "NumPy arrays between the corrector's calls); use --device cpu")
        if self.zo.sparsity > 0 and self.zo.ratios == "zo-grasp":
            raise UserError("zo.ratios=zo-grasp scores a classifier's loss; for a corrector use zo.ratios=random, "
                            "magnitude or a ratios JSON file (or zo.sparsity=0)")
        if self.train.mode == "zo-sol" and self.optim.method == "fo":
            raise UserError("train.mode=zo-sol estimates gradients through the black-box solver: optim.method must "
                            "be zo-cge, zo-rge or zo-mezo (fo-sol is the backprop mode)")
        for key, value in {"solver.factor": self.solver.factor, "data.train_sims": self.data.train_sims,
                           "data.test_sims": self.data.test_sims, "data.steps": self.data.steps,
                           "data.batch": self.data.batch, "model.width": self.model.width,
                           "model.kernel_size": self.model.kernel_size, "train.batch_size": self.train.batch_size,
                           "train.steps_per_epoch": self.train.steps_per_epoch,
                           "evaluate.horizon": self.evaluate.horizon}.items():
            if value < 1:
                raise UserError(f"config key '{key}' must be >= 1; got {value}")
        for key, value in {"data.spinup": self.data.spinup, "evaluate.sims": self.evaluate.sims,
                           "evaluate.every": self.evaluate.every, "evaluate.gif_frames": self.evaluate.gif_frames
                           }.items():
            if value < 0:
                raise UserError(f"config key '{key}' must be >= 0; got {value}")
        if self.model.depth < 2 or self.model.kernel_size % 2 == 0:
            raise UserError(f"config keys 'model.depth' must be >= 2 and 'model.kernel_size' odd; got "
                            f"{self.model.depth}, {self.model.kernel_size}")
        if not self.solver.timeout > 0:
            raise UserError(f"config key 'solver.timeout' must be > 0; got {self.solver.timeout}")
        m = self.unroll
        if max(m) >= self.data.steps:
            raise UserError(f"config key 'train.unroll' asks for {max(m)} unrolled steps, but a simulation keeps "
                            f"only data.steps = {self.data.steps} frames")
        if self.solver.family == "wake" and (self.data.train_sims > 6 or self.data.test_sims > 5):
            raise UserError(f"the wake family has Um et al.'s 6 training and 5 test Reynolds numbers: data.train_sims "
                            f"<= 6 and data.test_sims <= 5; got {self.data.train_sims} and {self.data.test_sims}")
        if len(m) > self.optim.epochs:
            raise UserError(f"config key 'train.unroll' lists {len(m)} unroll lengths for {self.optim.epochs} epochs: "
                            "give at least one epoch per length")
        if self.evaluate.every > self.data.steps - 1:
            raise UserError(f"config key 'evaluate.every' ({self.evaluate.every}) must be below data.steps "
                            f"({self.data.steps}): the reference has no frames beyond it")
        if self.evaluate.horizon > self.data.steps - 1:
            raise UserError(f"config key 'evaluate.horizon' ({self.evaluate.horizon}) must be below data.steps "
                            f"({self.data.steps}): the reference has no frames beyond it")

    @property
    def method(self) -> str:
        """The gradient method the mode implies: zo-sol uses optim.method; the others backprop (fo)."""
        return self.optim.method if self.train.mode == "zo-sol" else "fo"

    @property
    def unroll(self) -> list[int]:
        return unroll_list(self.train.unroll)

    def phase_unroll(self, epoch: int) -> int:
        """m for ``epoch`` under the curriculum: the epochs split evenly over the listed m."""
        m, total = self.unroll, max(1, self.optim.epochs)
        return m[min(len(m) - 1, epoch * len(m) // total)]


def _not_the_cpu(device: str) -> bool:
    """``auto`` or a device name PyTorch knows other than the CPU (an unknown name is left to the
    runtime's own one-line error)."""
    import torch

    if device.strip() == "auto":
        return True
    try:
        return torch.device(device).type != "cpu"
    except RuntimeError:
        return False


def unroll_list(text: Any) -> list[int]:
    try:
        values = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"config key 'train.unroll' must be comma-separated unroll lengths >= 1, e.g. 1,4,16; "
                        f"got '{text}'")
    return values


def data_key(cfg: PDEConfig) -> dict[str, Any]:
    """The settings a dataset depends on (a changed one means a different dataset)."""
    s, d = cfg.solver, cfg.data
    return {"family": s.family, "reference": s.reference, "reference_options": s.reference_options,
            "factor": s.factor, "train_sims": d.train_sims, "test_sims": d.test_sims, "spinup": d.spinup,
            "steps": d.steps, "seed": cfg.run.seed}


def optional_dir(text: str) -> Optional[Path]:
    return Path(text) if text else None
