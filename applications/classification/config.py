"""Typed config of ``deepzero classify`` (presets in ``presets/*.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.runtime.config import check_choice
from core.runtime.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
METHODS = ("zo-cge", "zo-rge", "zo-mezo", "fo")
ARCHS = ("cnn", "lenet5", "resnet20")


@dataclass
class DataConfig:
    name: str = "mnist"                    # mnist | digits | cifar10 | imagefolder
    data_root: Optional[str] = None        # needed for cifar10 / imagefolder
    batch_size: int = 64
    test_batch_size: int = 500
    train_subset: int = 0                  # use only the first N training samples (0 = all)
    image_size: int = 64                   # imagefolder only


@dataclass
class ModelConfig:
    arch: str = "cnn"                      # cnn | lenet5 | resnet20
    depth: int = 3                         # cnn: number of conv blocks
    width: int = 18                        # cnn: channels per conv


@dataclass
class ZOConfig:
    mu: float = 5e-3                       # finite-difference step
    central: bool = False                  # CGE central difference
    q: int = 0                             # RGE/MeZO directions (0 = number of parameters for RGE, 1 for MeZO)
    distribution: str = "gaussian"         # RGE: gaussian | sphere
    sparsity: float = 0.9                  # fraction of conv/linear weight coordinates without a ZO gradient
    ratios: str = "zo-grasp"               # zo-grasp | random | magnitude | path to a ratios JSON
    refresh_epochs: int = 1                # redraw the random masks every N epochs
    grasp_q: int = 192                     # ZO-GraSP directions
    grasp_per_class: int = 25              # ZO-GraSP images per class
    chunk: int = 0                         # fast CGE engine perturbations per batch (0 = automatic)


@dataclass
class OptimConfig:
    method: str = "zo-cge"                 # zo-cge | zo-rge | zo-mezo | fo
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    warmup_epochs: int = 1                 # linear warm-up, then cosine decay to 0


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "cpu"                    # cpu | cuda | cuda:N | auto
    checkpoint_dir: str = "runs/classify"  # relative to the project root
    run_name: Optional[str] = None


@dataclass
class ClassifyConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        from core.runtime.data import DATASETS

        check_choice("data.name", self.data.name, DATASETS)
        check_choice("model.arch", self.model.arch, ARCHS)
        check_choice("optim.method", self.optim.method, METHODS)
        check_choice("zo.distribution", self.zo.distribution, ("gaussian", "sphere"))
        positive = {"data.batch_size": self.data.batch_size, "data.test_batch_size": self.data.test_batch_size,
                    "optim.epochs": self.optim.epochs, "model.depth": self.model.depth,
                    "model.width": self.model.width, "zo.refresh_epochs": self.zo.refresh_epochs,
                    "zo.grasp_q": self.zo.grasp_q, "zo.grasp_per_class": self.zo.grasp_per_class}
        for key, value in positive.items():
            if value < 1:
                raise UserError(f"config key '{key}' must be >= 1; got {value}")
        if not 0.0 <= self.zo.sparsity < 1.0:
            raise UserError(f"config key 'zo.sparsity' must be in [0, 1); got {self.zo.sparsity}")
        if not self.zo.mu > 0 or not self.optim.lr > 0:
            raise UserError("config keys 'zo.mu' and 'optim.lr' must be > 0")
        if self.optim.warmup_epochs < 0 or self.data.train_subset < 0 or self.zo.q < 0 or self.zo.chunk < 0:
            raise UserError("config keys optim.warmup_epochs, data.train_subset, zo.q, zo.chunk must be >= 0")
