"""Typed config of ``deepzero defense`` (presets in ``presets/*.yaml``).

``optim.method`` is the training method: ``fo-ds`` (backprop through the classifier: the white-box
upper bound), ``zo-ae-ds`` (ZO in an autoencoder's latent, Zhang et al. 2022) or ``zo-ds`` (sparse
CGE on the denoiser itself, DeepZero). The ``zo``, ``optim`` and ``run`` blocks are the shared ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.runtime.blocks import OptimConfig, RunConfig, ZOConfig, validate_blocks
from core.runtime.config import check_choice
from core.runtime.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
METHODS = ("fo-ds", "zo-ae-ds", "zo-ds")
OBJECTIVES = ("mse", "stab", "mse+stab")
AE_ZO = ("rge", "cge")
RESUME_SAFE = ("data.data_root", "data.test_subset", "target.timeout", "target.budget")


@dataclass
class DataConfig:
    name: str = "mnist"                    # mnist | digits | cifar10 | imagefolder (pixels in [0, 1])
    data_root: Optional[str] = None
    batch_size: int = 32
    train_subset: int = 0                  # first N training images (0 = all)
    test_subset: int = 200                 # test images for the per-epoch evaluation
    image_size: int = 64                   # imagefolder only


@dataclass
class TargetConfig:
    source: str = "train"                  # train | CHECKPOINT | pkg.mod:fn | exec:COMMAND | http://127.0.0.1:PORT
    labels_only: bool = False              # the black box answers labels, not logits
    max_batch: int = 0                     # at most this many images per query call (0 = no limit)
    budget: int = 0                        # training queries to the classifier (0 = no limit)
    timeout: float = 60.0                  # seconds per call of an external classifier
    arch: str = "cnn"                      # source=train: the classifier trained (FO, clean data)
    depth: int = 3
    width: int = 18
    epochs: int = 3
    lr: float = 0.01                       # Adam, one-cycle peak


@dataclass
class DenoiserConfig:
    depth: int = 5                         # DnCNN: conv+ReLU, depth−2 × conv+BN+ReLU, conv
    width: int = 32
    sigma: float = 0.25                    # Gaussian noise level the denoiser is trained for (pixels)
    objective: str = "mse+stab"            # mse | stab | mse+stab (MSE pre-training, then Stab)
    pretrain_epochs: int = 2               # mse+stab: MSE epochs (backprop on the denoiser alone, no queries)
    pretrain_lr: float = 1e-3              # Adam: the MSE phase, and FO-DS's Stab phase


@dataclass
class AEConfig:
    width: int = 16                        # zo-ae-ds: the autoencoder (pre-trained by reconstruction)
    latent_channels: int = 4
    downsamples: int = 2
    epochs: int = 2
    lr: float = 1e-3
    zo: str = "rge"                        # ZO in the latent z: rge (q = zo.q) or cge (central, 2d queries)


@dataclass
class CertifyConfig:
    sigma: float = 0.25                    # smoothing noise (usually the denoiser's sigma)
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch: int = 500                       # noisy images per classifier call
    skip: int = 20                         # certify every skip-th test image
    max: int = 50                          # at most this many images (0 = all)
    radii: str = "0,0.25,0.5,0.75"


@dataclass
class DefenseConfig:
    data: DataConfig = field(default_factory=DataConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    zo: ZOConfig = field(default_factory=lambda: ZOConfig(sparsity=0.9, q=192, grasp_q=64, grasp_per_class=5))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(method="zo-ds", lr=1e-3, momentum=0.9,
                                                                   weight_decay=0.0, epochs=2, warmup_epochs=0))
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        from core.runtime.data import DATASETS

        check_choice("data.name", self.data.name, DATASETS)
        check_choice("denoiser.objective", self.denoiser.objective, OBJECTIVES)
        check_choice("ae.zo", self.ae.zo, AE_ZO)
        validate_blocks(self, methods=METHODS)
        for key, value in {"data.batch_size": self.data.batch_size, "data.test_subset": self.data.test_subset,
                           "denoiser.depth": self.denoiser.depth, "denoiser.width": self.denoiser.width,
                           "ae.width": self.ae.width, "ae.latent_channels": self.ae.latent_channels,
                           "certify.n0": self.certify.n0, "certify.n": self.certify.n,
                           "certify.batch": self.certify.batch, "certify.skip": self.certify.skip,
                           "target.epochs": self.target.epochs}.items():
            if value < 1:
                raise UserError(f"config key '{key}' must be >= 1; got {value}")
        for key, value in {"data.train_subset": self.data.train_subset, "target.max_batch": self.target.max_batch,
                           "target.budget": self.target.budget, "certify.max": self.certify.max,
                           "denoiser.pretrain_epochs": self.denoiser.pretrain_epochs,
                           "ae.epochs": self.ae.epochs}.items():
            if value < 0:
                raise UserError(f"config key '{key}' must be >= 0; got {value}")
        if self.denoiser.depth < 3:
            raise UserError(f"config key 'denoiser.depth' must be >= 3 (first, middle and last conv); "
                            f"got {self.denoiser.depth}")
        for key, value in {"denoiser.sigma": self.denoiser.sigma, "certify.sigma": self.certify.sigma,
                           "target.timeout": self.target.timeout, "denoiser.pretrain_lr": self.denoiser.pretrain_lr,
                           "ae.lr": self.ae.lr, "target.lr": self.target.lr}.items():
            if not value > 0:
                raise UserError(f"config key '{key}' must be > 0; got {value}")
        if not 0.0 < self.certify.alpha < 1.0:
            raise UserError(f"config key 'certify.alpha' must be in (0, 1); got {self.certify.alpha}")
        if self.certify.n0 > self.certify.n:
            raise UserError(f"config key 'certify.n0' ({self.certify.n0}) must not exceed certify.n "
                            f"({self.certify.n})")
        radii(self.certify.radii)
        if self.optim.method != "fo-ds" and self.target.labels_only and self.denoiser.objective != "mse":
            raise UserError(f"optim.method={self.optim.method} with the Stab objective needs the classifier's "
                            "logits; a labels-only black box (target.labels_only) supports certification and "
                            "denoiser.objective=mse only")

    @property
    def stab_epochs(self) -> int:
        return 0 if self.denoiser.objective == "mse" else self.optim.epochs

    @property
    def mse_epochs(self) -> int:
        return {"mse": self.optim.epochs, "stab": 0, "mse+stab": self.denoiser.pretrain_epochs}[self.denoiser.objective]


def radii(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise UserError(f"config key 'certify.radii' must be comma-separated radii >= 0, e.g. 0,0.25,0.5; got '{text}'")
    return values
