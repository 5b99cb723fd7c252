"""A minimal application on the shared experiment loop: a config schema, a step and an evaluation.

A small network whose last stage is a query-only ``BlackBox`` (with a budget) is fitted to a
teacher by RGE. Run as ``python -m tests.core.runtime.toy_app train [--resume CKPT] [--set ...]``;
``--set data.sleep=0.05`` slows every step so a test can interrupt a run between checkpoints.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.blackbox import BlackBox, BudgetExceeded
from core.runtime.blocks import OptimConfig, RunConfig, ZOConfig, make_estimator, make_optimizer, validate_blocks
from core.runtime.experiment import Experiment


@dataclass
class ToyData:
    n: int = 96
    batch_size: int = 16
    sleep: float = 0.0                    # seconds per step (lets tests interrupt a run)
    budget: Optional[int] = None          # query budget of the black-box stage


@dataclass
class ToyConfig:
    data: ToyData = field(default_factory=ToyData)
    zo: ZOConfig = field(default_factory=lambda: ZOConfig(q=4, sparsity=0.0, mu=1e-3))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(method="zo-rge", lr=0.05, epochs=3,
                                                                   warmup_epochs=0))
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        validate_blocks(self, methods=("zo-rge", "zo-cge", "zo-mezo"))


def _readout(h: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, h.shape[1] * 2, dtype=h.dtype).reshape(h.shape[1], 2)
    return h @ w


class ToyExperiment(Experiment):
    app = "toy"
    stop_errors = (BudgetExceeded,)
    plot_metric = "test_mse"

    def __init__(self, cfg: ToyConfig, *, resume=None) -> None:
        super().__init__(cfg, resume=resume)
        torch.manual_seed(cfg.run.seed)
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(cfg.data.n, 4, generator=g)
        teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        with torch.no_grad():
            self.y = _readout(teacher(self.x))
        self.oracle = BlackBox(_readout, budget=cfg.data.budget, name="oracle")
        self.model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), self.oracle)
        self.estimator = make_estimator(cfg.zo, cfg.optim.method, self.model, seed=cfg.run.seed)
        self._steps = -(-cfg.data.n // cfg.data.batch_size)
        self.optimizer, self.scheduler = make_optimizer(cfg.optim, self.model.parameters(), self._steps)

    def batches(self, epoch):
        order = torch.randperm(self.cfg.data.n, generator=torch.Generator().manual_seed(1000 + epoch))
        for i in range(0, self.cfg.data.n, self.cfg.data.batch_size):
            idx = order[i:i + self.cfg.data.batch_size]
            yield self.x[idx], self.y[idx]

    def steps_per_epoch(self):
        return self._steps

    def train_step(self, batch):
        if self.cfg.data.sleep:
            time.sleep(self.cfg.data.sleep)
        x, y = batch
        return {"loss": self.optimize(F.mse_loss, x, y)}

    def evaluate(self):
        with torch.no_grad():
            h = self.model[1](self.model[0](self.x))
            return {"test_mse": float(F.mse_loss(_readout(h), self.y))}


def main(argv=None) -> int:
    from core.runtime.cli import Parser, add_config_args, add_runtime_args, add_train_args, run_guarded, train_command

    p = Parser(prog="toy")
    sub = p.add_subparsers(dest="verb", parser_class=Parser)
    t = sub.add_parser("train")
    add_config_args(t, [])
    add_runtime_args(t)
    add_train_args(t)
    args = p.parse_args(argv)
    return run_guarded(lambda: train_command(args, schema=ToyConfig, preset_dir=None,
                                             experiment=ToyExperiment, prog="toy train",
                                             safe_keys=("data.sleep", "data.budget")), "toy train")


if __name__ == "__main__":
    sys.exit(main())
