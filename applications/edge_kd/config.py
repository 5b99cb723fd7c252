"""Typed config of ``deepzero kd`` (presets in ``presets/*.yaml``, device profiles in ``devices/*.yaml``).

``optim.method`` is how the student learns: ``fo`` (backprop), ``zo-cge`` (sparse CGE, DeepZero),
``zo-rge`` or ``zo-mezo`` (MeZO, Malladi et al. 2023: forward passes only, parameters updated in
place — the memory of inference). The ``zo``, ``optim`` and ``run`` blocks are the shared ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from core.runtime.blocks import OptimConfig, RunConfig, ZOConfig, validate_blocks
from core.runtime.config import check_choice
from core.runtime.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
METHODS = ("fo", "zo-cge", "zo-rge", "zo-mezo")
ON_DEVICE = ("none", "fo", "zo")
RESUME_SAFE = ("data.data_root", "data.test_batch_size", "teacher.max_batch")


@dataclass
class DataConfig:
    name: str = "mnist"                    # mnist | digits | cifar10 | imagefolder (pixels in [0, 1])
    data_root: Optional[str] = None
    batch_size: int = 64
    test_batch_size: int = 500
    train_subset: int = 0                  # first N training images (0 = all), validation included
    val_size: int = 500                    # the last val_size of those: validation for halting decisions
    image_size: int = 64                   # imagefolder only


@dataclass
class TeacherConfig:
    source: str = ""                       # a classify checkpoint or pkg.module:callable ("" : kd run trains one)
    budget: int = 0                        # training queries the teacher answers (0 = no limit)
    max_batch: int = 0                     # images per teacher call (0 = no limit)
    arch: str = "cnn"                      # kd run without a source: `deepzero classify train` (FO) of this
    depth: int = 3
    width: int = 48
    epochs: int = 3
    lr: float = 0.05


@dataclass
class DeviceConfig:
    profile: str = "rpi4"                  # a preset (rpi4, jetson-nano, mcu) or a profile YAML; CLI --device


@dataclass
class StudentConfig:
    depth: int = 0                         # cnn blocks; 0 (with width 0) = designed for the device
    width: int = 0                         # channels per block
    base_depth: int = 3                    # the reference student when the teacher is not a zoo cnn
    base_width: int = 32
    train_on_device: str = "none"          # none | fo | zo: the measured training-step memory must fit RAM too


@dataclass
class KDConfig:
    alpha: float = 0.5                     # weight of the label cross-entropy
    temperature: float = 4.0               # T


@dataclass
class HaltingConfig:
    policy: str = "none"                   # none | plateau | drop | teacher | freeze
    patience: int = 2                      # plateau: epochs without improvement
    min_delta: float = 0.002               # plateau: validation accuracy gain that counts
    rho: float = 0.995                     # plateau: halt at rho x teacher validation accuracy (0 = off)
    drop_confidence: float = 0.8           # drop: probability of the true class that counts as learned
    drop_patience: int = 2                 # drop: learned visits in a row
    drop_max_fraction: float = 0.9         # drop: at most this fraction of the samples leaves
    teacher_agreement: float = 0.75        # teacher: student-teacher agreement that counts as mature
    teacher_window: int = 256              # teacher: recent training samples it is measured on
    freeze_tol: float = 0.1                # freeze: relative weight change per epoch that counts as converged
    freeze_patience: int = 1               # freeze: epochs in a row


@dataclass
class SweepConfig:
    methods: str = "fo,zo-cge"             # kd run: methods trained with and without each halting policy
    policies: str = "plateau,drop,teacher,freeze"
    baseline_only: str = "zo-mezo"         # kd run: methods trained without halting only
    lr: Dict[str, float] = field(default_factory=lambda: {"zo-cge": 0.1, "zo-rge": 0.01, "zo-mezo": 0.01})
    epochs: Dict[str, int] = field(default_factory=dict)   # per-method epochs (default optim.epochs)


@dataclass
class ExportConfig:
    check_samples: int = 64                # test images compared between PyTorch and onnxruntime
    latency_repeats: int = 200             # timed single-image inferences


@dataclass
class KDAppConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    halting: HaltingConfig = field(default_factory=HaltingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    zo: ZOConfig = field(default_factory=lambda: ZOConfig(sparsity=0.9, grasp_q=32, grasp_per_class=5))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(method="fo", lr=0.1, momentum=0.9,
                                                                   weight_decay=5e-4, epochs=6, warmup_epochs=0))
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        from applications.edge_kd.halting import POLICIES
        from applications.edge_kd.profiles import load_profile
        from core.runtime.data import DATASETS

        load_profile(self.device.profile)                # a missing or malformed profile fails here, first
        check_choice("data.name", self.data.name, DATASETS)
        check_choice("student.train_on_device", self.student.train_on_device, ON_DEVICE)
        check_choice("halting.policy", self.halting.policy, POLICIES)
        check_choice("teacher.arch", self.teacher.arch, ("cnn", "lenet5", "resnet20"))
        validate_blocks(self, methods=METHODS)
        if not 0.0 <= self.kd.alpha <= 1.0:
            raise UserError(f"config key 'kd.alpha' must be in [0, 1]; got {self.kd.alpha}")
        if not self.kd.temperature > 0:
            raise UserError(f"config key 'kd.temperature' must be > 0; got {self.kd.temperature}")
        _positive({"data.batch_size": self.data.batch_size, "data.test_batch_size": self.data.test_batch_size,
                   "data.val_size": self.data.val_size, "student.base_depth": self.student.base_depth,
                   "student.base_width": self.student.base_width, "teacher.depth": self.teacher.depth,
                   "teacher.width": self.teacher.width, "teacher.epochs": self.teacher.epochs,
                   "halting.patience": self.halting.patience, "halting.drop_patience": self.halting.drop_patience,
                   "halting.teacher_window": self.halting.teacher_window,
                   "halting.freeze_patience": self.halting.freeze_patience,
                   "export.check_samples": self.export.check_samples,
                   "export.latency_repeats": self.export.latency_repeats, "teacher.lr": self.teacher.lr,
                   "halting.freeze_tol": self.halting.freeze_tol})
        for key, value in {"data.train_subset": self.data.train_subset, "teacher.budget": self.teacher.budget,
                           "teacher.max_batch": self.teacher.max_batch, "student.depth": self.student.depth,
                           "student.width": self.student.width, "halting.min_delta": self.halting.min_delta,
                           "halting.rho": self.halting.rho}.items():
            if value < 0:
                raise UserError(f"config key '{key}' must be >= 0; got {value}")
        if self.halting.rho > 1:
            raise UserError(f"config key 'halting.rho' must be in [0, 1] (a fraction of the teacher's accuracy; 0 = "
                            f"off); got {self.halting.rho}")
        if (self.student.depth == 0) != (self.student.width == 0):
            raise UserError("config keys 'student.depth' and 'student.width' go together: both 0 (design the "
                            f"student for the device) or both >= 1; got {self.student.depth}, {self.student.width}")
        for key, value in {"halting.drop_confidence": self.halting.drop_confidence,
                           "halting.drop_max_fraction": self.halting.drop_max_fraction,
                           "halting.teacher_agreement": self.halting.teacher_agreement}.items():
            if not 0.0 < value <= 1.0:
                raise UserError(f"config key '{key}' must be in (0, 1]; got {value}")
        if self.data.train_subset and self.data.train_subset <= self.data.val_size:
            raise UserError(f"config key 'data.train_subset' ({self.data.train_subset}) must exceed data.val_size "
                            f"({self.data.val_size}): the validation samples come out of the training subset")
        sweep_methods(self.sweep)


def _positive(values: dict[str, float]) -> None:
    for key, value in values.items():
        if not value > 0:
            raise UserError(f"config key '{key}' must be > 0; got {value}")


def _names(text: str, key: str, allowed: tuple[str, ...], *, empty_ok: bool) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or (not names and not empty_ok):
        raise UserError(f"config key '{key}' must be comma-separated names from {', '.join(allowed)}; got '{text}'")
    return names


def sweep_methods(sweep: SweepConfig) -> tuple[list[str], list[str], list[str]]:
    """(methods with halting, halting policies, methods without halting) of the ``sweep`` block, checked."""
    from applications.edge_kd.halting import POLICIES

    methods = _names(sweep.methods, "sweep.methods", METHODS, empty_ok=False)
    policies = _names(sweep.policies, "sweep.policies", POLICIES[1:], empty_ok=True)
    extra = _names(sweep.baseline_only, "sweep.baseline_only", METHODS, empty_ok=True)
    for key, table in (("sweep.lr", sweep.lr), ("sweep.epochs", sweep.epochs)):
        for method, value in table.items():
            if method not in METHODS:
                raise UserError(f"config key '{key}.{method}': not a method; methods: {', '.join(METHODS)}")
            if not value > 0:
                raise UserError(f"config key '{key}.{method}' must be > 0; got {value}")
    return methods, policies, extra
