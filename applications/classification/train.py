"""ZO training from scratch: sparse CGE (DeepZero), RGE, MeZO, or backprop — on the shared experiment loop.

The app supplies what is its own (data, model, one cross-entropy step, test accuracy); the loop,
checkpoints, resume, metrics and plots are :mod:`core.runtime.loop`'s.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from applications.classification.config import ClassifyConfig
from core.blackbox import BudgetExceeded
from core.runtime.blocks import make_estimator, make_optimizer, ratio_table, sparsity_ratios
from core.runtime.cli import resolve_device
from core.runtime.data import Dataset, DataSplit, batches, load_dataset
from core.runtime.experiment import Experiment
from core.runtime.plotting import tsv
from core.runtime.seeding import seed_everything


def grasp_batch(data: Dataset, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` training images of every class, drawn reproducibly."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(data.num_classes):
        idx = (data.train.y == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    idx = torch.cat(picks)
    return data.train.x[idx], data.train.y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, split: DataSplit, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on ``split``, in eval mode."""
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in batches(split, batch_size, shuffle=False):
        out = model(x.to(device))
        correct += int((out.argmax(1) == y.to(device)).sum())
        loss += float(F.cross_entropy(out, y.to(device), reduction="sum"))
        n += len(y)
    model.train(was)
    return correct / n, loss / n


class ClassifyExperiment(Experiment):
    """One classification run: data, model, sparsity plan, estimator, SGD with warm-up + cosine."""

    app = "classify"
    stop_errors = (BudgetExceeded,)
    plot_metric = "test_accuracy"

    def __init__(self, cfg: ClassifyConfig, *, resume: dict[str, Any] | None = None,
                 data: Dataset | None = None) -> None:
        from core.models import build_model, model_spec
        from core.sparsity import SparsityPlan

        super().__init__(cfg, resume=resume)
        self.device = resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        self.data = data or load_dataset(cfg.data.name, cfg.data.data_root, image_size=cfg.data.image_size)
        if cfg.data.train_subset:
            self.data.train = DataSplit(self.data.train.x[:cfg.data.train_subset],
                                        self.data.train.y[:cfg.data.train_subset])
        self.data.train = DataSplit(self.data.train.x.to(self.device), self.data.train.y.to(self.device))
        self.data.test = DataSplit(self.data.test.x.to(self.device), self.data.test.y.to(self.device))
        kwargs = {"in_channels": self.data.input_shape[0], "num_classes": self.data.num_classes}
        if cfg.model.arch == "cnn":
            kwargs.update(depth=cfg.model.depth, width=cfg.model.width, image_size=self.data.input_shape[1])
        elif cfg.model.arch == "lenet5":
            kwargs.update(image_size=self.data.input_shape[1])
        self.model = build_model(cfg.model.arch, **kwargs).to(self.device)
        self.model_spec = model_spec(self.model, normalize=self.data.normalization)
        self._steps = math.ceil(len(self.data.train) / cfg.data.batch_size)
        method = cfg.optim.method
        if method != "fo":
            if resume is not None:                       # the run's ratios, not a fresh ZO-GraSP
                self.ratios = resume.get("ratios")
            else:
                x, y = grasp_batch(self.data, cfg.zo.grasp_per_class, cfg.run.seed)
                self.ratios = sparsity_ratios(cfg.zo, self.model, F.cross_entropy, x, y, seed=cfg.run.seed)
        if self.ratios is not None:
            self.plan = SparsityPlan(self.model, self.ratios, refresh_every=cfg.zo.refresh_epochs * self._steps,
                                     seed=cfg.run.seed + 3)
        self.estimator = make_estimator(cfg.zo, method, self.model, plan=self.plan, seed=cfg.run.seed)
        self.optimizer, self.scheduler = make_optimizer(cfg.optim, self.model.parameters(), self._steps)

    # -- the app's own parts ---------------------------------------------------------------------
    def batches(self, epoch: int):
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + epoch)
        return batches(self.data.train, self.cfg.data.batch_size, shuffle=True, generator=gen)

    def steps_per_epoch(self) -> int:
        return self._steps

    def train_step(self, batch) -> dict[str, float]:
        x, y = batch
        return {"loss": self.optimize(F.cross_entropy, x, y)}

    def evaluate(self) -> dict[str, float]:
        acc, loss = evaluate(self.model, self.data.test, self.cfg.data.test_batch_size, self.device)
        return {"test_loss": loss, "test_accuracy": acc}

    def run_name(self) -> str:
        return f"{self.cfg.optim.method}-{self.cfg.model.arch}"

    def summary(self) -> str:
        cfg = self.cfg
        depth = f"-{cfg.model.depth}" if cfg.model.arch == "cnn" else ""
        return f"{cfg.optim.method} on {cfg.data.name}, {cfg.model.arch}{depth}, {cfg.optim.epochs} epochs"

    def tags(self) -> dict[str, Any]:
        return {"n_params": count_params(self.model)}

    def start_artifacts(self, tracker) -> None:
        if self.ratios is not None:
            import json

            tracker.log_text(json.dumps(self.ratios, indent=2), "sparsity/ratios.json")
            tracker.log_text(tsv(ratio_table(self.model, self.ratios)), "sparsity/ratios.tsv")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
