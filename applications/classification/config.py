"""Typed config of ``deepzero classify`` (presets in ``presets/*.yaml``).

The ``zo``, ``optim`` and ``run`` blocks are the shared ones of :mod:`core.runtime.blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.runtime.blocks import OptimConfig, RunConfig, ZOConfig, validate_blocks
from core.runtime.config import check_choice
from core.runtime.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
METHODS = ("zo-cge", "zo-rge", "zo-mezo", "fo")
ARCHS = ("cnn", "lenet5", "resnet20")
# keys a resumed run may change besides the shared ones (more epochs, another device, ...)
RESUME_SAFE = ("data.data_root", "data.test_batch_size")


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
        validate_blocks(self, methods=METHODS)
        for key, value in {"data.batch_size": self.data.batch_size, "data.test_batch_size": self.data.test_batch_size,
                           "model.depth": self.model.depth, "model.width": self.model.width}.items():
            if value < 1:
                raise UserError(f"config key '{key}' must be >= 1; got {value}")
        if self.data.train_subset < 0:
            raise UserError(f"config key 'data.train_subset' must be >= 0; got {self.data.train_subset}")
