"""ZO training from scratch: sparse CGE (DeepZero), RGE, MeZO, or backprop, with exact resume."""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from applications.classification.config import ClassifyConfig
from applications.classification.models import build_model, count_params
from core.runtime.checkpoint import save_checkpoint
from core.runtime.cli import resolve_device
from core.runtime.config import flatten
from core.runtime.data import Dataset, batches, load_dataset
from core.runtime.errors import UserError
from core.runtime.seeding import get_rng_state, seed_everything, set_rng_state
from core.runtime.tracking import Tracker, project_root


def grasp_batch(data: Dataset, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` training images of every class, drawn reproducibly."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(data.num_classes):
        idx = (data.train.y == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    idx = torch.cat(picks)
    return data.train.x[idx], data.train.y[idx]


def layer_ratios(cfg: ClassifyConfig, model: nn.Module, data: Dataset, device: torch.device) -> dict[str, float] | None:
    """Layer-wise pruning ratios from ZO-GraSP, a baseline, or a file; None when training dense."""
    from core.sparsity import load_ratios, magnitude_ratios, random_ratios, zo_grasp_ratios

    if cfg.optim.method == "fo" or cfg.zo.sparsity == 0.0:
        return None
    how = cfg.zo.ratios
    if how == "random":
        return random_ratios(model, cfg.zo.sparsity)
    if how == "magnitude":
        return magnitude_ratios(model, cfg.zo.sparsity)
    if how == "zo-grasp":
        x, y = grasp_batch(data, cfg.zo.grasp_per_class, cfg.run.seed)
        gen = torch.Generator().manual_seed(cfg.run.seed + 17)
        return zo_grasp_ratios(model, F.cross_entropy, x.to(device), y.to(device), cfg.zo.sparsity,
                               q=cfg.zo.grasp_q, mu=cfg.zo.mu, generator=gen)
    return load_ratios(how, model)


def make_estimator(cfg: ClassifyConfig, model: nn.Module, plan) -> Any:
    from core import CGE, RGE, MeZO

    method = cfg.optim.method
    if method == "zo-cge":
        return CGE(model, mu=cfg.zo.mu, central=cfg.zo.central, sparsity=plan, chunk=cfg.zo.chunk or None)
    if method == "zo-rge":
        return RGE(model, q=cfg.zo.q or count_params(model), mu=cfg.zo.mu, distribution=cfg.zo.distribution,
                   sparsity=plan, seed=cfg.run.seed + 1)
    if method == "zo-mezo":
        return MeZO(model, mu=cfg.zo.mu, q=cfg.zo.q or 1, sparsity=plan, seed=cfg.run.seed + 2)
    return None


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(test accuracy in [0, 1], test loss)."""
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in batches(data.test, batch_size, shuffle=False):
        out = model(x.to(device))
        correct += int((out.argmax(1) == y.to(device)).sum())
        loss += float(F.cross_entropy(out, y.to(device), reduction="sum"))
        n += len(y)
    model.train(was)
    return correct / n, loss / n


class Trainer:
    """Everything one training run holds, so that a checkpoint restores it exactly."""

    def __init__(self, cfg: ClassifyConfig, *, data: Dataset | None = None) -> None:
        from core.sparsity import SparsityPlan

        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        self.data = data or load_dataset(cfg.data.name, cfg.data.data_root, image_size=cfg.data.image_size)
        if cfg.data.train_subset:
            self.data.train.x = self.data.train.x[:cfg.data.train_subset]
            self.data.train.y = self.data.train.y[:cfg.data.train_subset]
        self.data.train.x, self.data.train.y = self.data.train.x.to(self.device), self.data.train.y.to(self.device)
        self.data.test.x, self.data.test.y = self.data.test.x.to(self.device), self.data.test.y.to(self.device)
        self.model = build_model(cfg.model.arch, depth=cfg.model.depth, width=cfg.model.width,
                                 input_shape=self.data.input_shape, num_classes=self.data.num_classes).to(self.device)
        self.steps_per_epoch = math.ceil(len(self.data.train) / cfg.data.batch_size)
        self.ratios = layer_ratios(cfg, self.model, self.data, self.device)
        self.plan = None
        if self.ratios is not None:
            self.plan = SparsityPlan(self.model, self.ratios, refresh_every=cfg.zo.refresh_epochs * self.steps_per_epoch,
                                     seed=cfg.run.seed + 3)
        self.estimator = make_estimator(cfg, self.model, self.plan)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        total = cfg.optim.epochs * self.steps_per_epoch
        warm = cfg.optim.warmup_epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, warm))
        self.epoch, self.step, self.fo_queries, self.wall = 0, 0, 0, 0.0
        self.history: list[dict[str, float]] = []

    @property
    def queries(self) -> int:
        return self.estimator.queries if self.estimator is not None else self.fo_queries

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.estimator is None:
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.fo_queries += len(y)
        else:
            loss = self.estimator.backward(F.cross_entropy, x, y)
        if not torch.isfinite(loss):
            raise UserError(f"training diverged (loss {float(loss)}) at step {self.step}: lower optim.lr or zo.mu")
        self.optimizer.step()
        self.scheduler.step()
        if self.plan is not None:
            self.plan.step()
        self.step += 1
        return float(loss.detach())

    def run_epoch(self, progress: bool, tracker: Tracker | None) -> dict[str, float]:
        from tqdm import tqdm

        cfg, start = self.cfg, time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.run.seed * 100_003 + self.epoch)
        losses = []
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        last_acc = self.history[-1]["test_accuracy"] if self.history else float("nan")
        for x, y in batches(self.data.train, cfg.data.batch_size, shuffle=True, generator=gen):
            loss = self.train_step(x, y)
            losses.append(loss)
            if tracker is not None:
                tracker.log_metrics({"step_loss": loss}, step=self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{last_acc:.3f}", queries=f"{self.queries:.3g}")
        bar.close()
        acc, test_loss = evaluate(self.model, self.data, cfg.data.test_batch_size, self.device)
        self.wall += time.perf_counter() - start
        self.epoch += 1
        row = {"epoch": self.epoch, "train_loss": sum(losses) / len(losses), "test_loss": test_loss,
               "test_accuracy": acc, "queries": float(self.queries), "wall_time_s": self.wall,
               "lr": self.optimizer.param_groups[0]["lr"]}
        self.history.append(row)
        return row

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self, run_id: str | None) -> dict[str, Any]:
        return {"app": "classify", "config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": get_rng_state(),
                "estimator": self.estimator.state_dict() if self.estimator is not None else None,
                "plan": self.plan.state_dict() if self.plan is not None else None, "ratios": self.ratios,
                "history": self.history, "wall_time_s": self.wall, "fo_queries": self.fo_queries,
                "mlflow_run_id": run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.estimator is not None and state["estimator"] is not None:
                self.estimator.load_state_dict(state["estimator"])
            if self.plan is not None and state["plan"] is not None:
                self.plan.load_state_dict(state["plan"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"checkpoint does not match this config/model: {str(exc).splitlines()[0][:200]}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history, self.wall = list(state["history"]), float(state["wall_time_s"])
        self.fo_queries = int(state["fo_queries"])
        set_rng_state(state["rng"])


def checkpoint_path(cfg: ClassifyConfig, run_id: str) -> Path:
    base = Path(cfg.run.checkpoint_dir)
    if not base.is_absolute():
        base = project_root() / base
    return base / run_id / "checkpoint.pt"


def log_plots(tracker: Tracker, history: list[dict[str, float]], title: str) -> None:
    from core.runtime.plotting import line_plot

    acc = [h["test_accuracy"] for h in history]
    for key, label, name in (("epoch", "epoch", "accuracy_vs_epoch.png"),
                             ("queries", "queries (per-sample evaluations)", "accuracy_vs_queries.png"),
                             ("wall_time_s", "wall time (s)", "accuracy_vs_wall_time.png")):
        fig = line_plot({title: ([h[key] for h in history], acc)}, xlabel=label, ylabel="test accuracy",
                        title=title)
        tracker.log_figure(fig, f"plots/{name}")


def train(cfg: ClassifyConfig, *, tracker: Tracker, resume: dict[str, Any] | None = None, progress: bool = True,
          data: Dataset | None = None, on_epoch: Callable[[dict[str, float]], None] | None = None,
          save_every_epoch: bool = True, trainer: Trainer | None = None) -> dict[str, Any]:
    """Train (or continue) one run; metrics, ratios, plots and the final checkpoint go to ``tracker``.

    Pass a ready ``trainer`` (and, to resume, its checkpoint ``resume``) to have every user mistake
    (data, device, model, checkpoint) surface before an MLflow run is opened.
    """
    if trainer is None:
        trainer = Trainer(cfg, data=data)
        if resume is not None:
            trainer.load_state_dict(resume)
    run_id = tracker.run_id
    ckpt = checkpoint_path(cfg, run_id)
    if resume is None:
        tracker.log_params(flatten(cfg))
        tracker.set_tags({"seed": cfg.run.seed, "n_params": count_params(trainer.model)})
        from core.runtime.config import to_yaml

        tracker.log_text(to_yaml(cfg), "config.yaml")
        if trainer.ratios is not None:
            import json

            tracker.log_text(json.dumps(trainer.ratios, indent=2), "sparsity/ratios.json")
            tracker.log_text(ratio_table(trainer.model, trainer.ratios), "sparsity/ratios.tsv")
    while trainer.epoch < cfg.optim.epochs:
        row = trainer.run_epoch(progress, tracker)
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=trainer.epoch)
        tracker.flush()
        if save_every_epoch:
            save_checkpoint(ckpt, trainer.state_dict(run_id))
        if on_epoch:
            on_epoch(row)
    if save_every_epoch:
        save_checkpoint(ckpt, trainer.state_dict(run_id))
        tracker.log_artifact(ckpt, "checkpoints")
    if trainer.history:
        log_plots(tracker, trainer.history, f"{cfg.optim.method} {cfg.model.arch}-{cfg.model.depth} on {cfg.data.name}")
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(trainer.history[0]), delimiter="\t")
        w.writeheader()
        w.writerows(trainer.history)
        tracker.log_text(buf.getvalue(), "history.tsv")
    return {"history": trainer.history, "checkpoint": ckpt, "n_params": count_params(trainer.model),
            "model": trainer.model, "run_id": run_id}


def ratio_table(model: nn.Module, ratios: dict[str, float]) -> str:
    params = dict(model.named_parameters())
    lines = ["layer\tparams\tpruned_ratio\tactive"]
    for name, r in ratios.items():
        n = params[name].numel()
        lines.append(f"{name}\t{n}\t{r:.4f}\t{n - round(r * n)}")
    return "\n".join(lines) + "\n"
