"""The defense verbs beyond training: the target, certification, verification and the main job.

``run_pipeline`` is the main job: train the classifier to defend (FO, clean pixels), then one child
MLflow run per variant — the bare classifier smoothed (no denoiser), FO-DS (white-box upper bound),
ZO-DS (DeepZero) and ZO-AE-DS — each certified by randomized smoothing on the same test images, and
one comparison table and certified-accuracy-vs-radius plot on the parent run. ZO-AE-DS gets exactly
the classifier queries ZO-DS used (equal query budgets), unless ``target.budget`` sets one for both.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from applications.certified_defense.config import DefenseConfig, radii
from core.runtime.cli import resolve_device
from core.runtime.errors import UserError, user_errors

METHOD_LABELS = {"none": "no denoiser", "fo-ds": "FO-DS (white-box)", "zo-ae-ds": "ZO-AE-DS", "zo-ds": "ZO-DS"}


def _data(cfg: DefenseConfig, *, subset: bool = True):
    """Pixels in [0, 1]; the denoisers train on ``data.train_subset``, the target on the whole split."""
    from core.runtime.data import DataSplit, load_dataset

    with user_errors():
        data = load_dataset(cfg.data.name, cfg.data.data_root, image_size=cfg.data.image_size, normalize=False)
    if subset and cfg.data.train_subset:
        data.train = DataSplit(data.train.x[:cfg.data.train_subset], data.train.y[:cfg.data.train_subset])
    return data


def _default_path(*parts: str) -> Path:
    from core.runtime.tracking import project_root

    return project_root().joinpath("runs", "defense", *parts)


# -- the target -------------------------------------------------------------------------------------
def train_and_save_target(cfg: DefenseConfig, *, out: str | None = None, data=None) -> tuple[Path, float, str]:
    """Train the classifier to defend, save it as a self-describing checkpoint, log a run."""
    from applications.certified_defense.provider import save_target, train_target
    from core.runtime.config import flatten
    from core.runtime.seeding import seed_everything
    from core.runtime.tracking import Tracker

    t = cfg.target
    data = data or _data(cfg, subset=False)
    path = Path(out) if out else _default_path("targets", f"target-{t.arch}{t.depth}-{cfg.data.name}-seed{cfg.run.seed}.pt")
    if path.is_dir():
        path = path / f"target-{t.arch}{t.depth}-{cfg.data.name}-seed{cfg.run.seed}.pt"
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    with user_errors():
        model, spec = train_target(data, arch=t.arch, depth=t.depth, width=t.width, epochs=t.epochs, lr=t.lr,
                                   batch_size=32, seed=cfg.run.seed, device=device)
    with torch.no_grad():
        acc = float((model(data.test.x.to(device)).argmax(1).cpu() == data.test.y).float().mean())
    model.cpu()
    with Tracker("defense", experiment=cfg.run.experiment, run_name=f"target-{t.arch}{t.depth}") as tr:
        tr.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("target.", "data.", "run."))})
        tr.set_tags({"deepzero.verb": "target", "seed": cfg.run.seed})
        tr.log_metrics({"clean_accuracy": acc})
        save_target(path, model, input_shape=data.input_shape, num_classes=data.num_classes)
        tr.log_artifact(path, "target")
    return path, acc, tr.run_id


# -- certification ----------------------------------------------------------------------------------
def smoothed_classifier(cfg: DefenseConfig, target, front: nn.Module | None):
    """``x ↦ f(front(x))`` as a query-counting callable for :class:`Smooth` (front in eval mode)."""
    from core.blackbox import BlackBox

    box = BlackBox(target.blackbox, max_batch=cfg.target.max_batch or None, name="classifier-certify")
    if front is not None:
        front.eval()

    @torch.no_grad()
    def classify(x: torch.Tensor) -> torch.Tensor:
        return box(front(x) if front is not None else x)

    return classify, box


def certify_front(cfg: DefenseConfig, target, front: nn.Module | None, test, out: Path, *, progress: bool):
    """Certify ``f∘front`` on the configured test subset; returns (rows, metrics, queries)."""
    from applications.certified_defense.certify import certify_split, summary
    from applications.certified_defense.smoothing import Smooth

    c = cfg.certify
    device = resolve_device(cfg.run.device)
    front = front.to(device) if front is not None else None
    classify, box = smoothed_classifier(cfg, target, front)
    smooth = Smooth(classify, target.num_classes, c.sigma, labels_only=target.labels_only)
    with user_errors():
        rows = certify_split(smooth, test.x.to(device), test.y, out, n0=c.n0, n=c.n, alpha=c.alpha,
                             batch_size=c.batch, skip=c.skip, max_examples=c.max or None, seed=cfg.run.seed,
                             progress=progress)
    metrics = summary(rows, radii(c.radii))
    metrics["certify_queries"] = float(box.queries)
    return rows, metrics


def certify_command(cfg: DefenseConfig, denoiser: str, *, out: str | None, progress: bool) -> int:
    from applications.certified_defense.certify import plot_curves
    from applications.certified_defense.train import front_from_checkpoint, target_from_config
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.config import flatten
    from core.runtime.tracking import Tracker

    front, name, source = None, "none", None
    if denoiser != "none":
        state = load_checkpoint(denoiser, app="defense")
        if state.get("kind") == "target" or "model_spec" not in state:
            raise UserError(f"{denoiser} is not a denoiser checkpoint of 'deepzero defense train'")
        with user_errors("denoiser checkpoint: "):
            front = front_from_checkpoint(state)
        name, source = state["config"]["optim"]["method"], state.get("mlflow_run_id")
    data = _data(cfg)
    with user_errors():
        target = target_from_config(cfg, data)
    path = Path(out) if out else _default_path("certify", f"{name}-{(source or 'raw')[:8]}-sigma{cfg.certify.sigma:g}.tsv")
    try:
        with Tracker("defense", experiment=cfg.run.experiment, run_name=f"certify-{name}") as tr:
            tr.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("certify.", "target.", "data."))})
            tr.set_tags({"deepzero.verb": "certify", "deepzero.source_run": source or "", "method": name})
            rows, metrics = certify_front(cfg, target, front, data.test, path, progress=progress)
            tr.log_metrics(metrics)
            tr.log_artifact(path, "certify")
            tr.log_figure(plot_curves({METHOD_LABELS.get(name, name): rows}, cfg.certify.sigma,
                                      f"σ = {cfg.certify.sigma:g}"), "certify/certified_accuracy_vs_radius.png")
    finally:
        target.close()
    print(_format_metrics(name, metrics))
    print(f"certification table: {path}")
    return 0


def _format_metrics(name: str, m: dict[str, float]) -> str:
    acc = "  ".join(f"{k.replace('certified_accuracy_', 'r=')}: {v:.3f}" for k, v in m.items()
                    if k.startswith("certified_accuracy_"))
    return f"{name:>10}  {acc}  ACR {m.get('acr', float('nan')):.3f}"


# -- verification (white-box comparator) ------------------------------------------------------------
def verify_command(cfg: DefenseConfig, *, denoiser: str | None, eps: str, norms: str, methods: str,
                   samples: int) -> int:
    from applications.certified_defense.train import front_from_checkpoint, target_from_config
    from applications.certified_defense.verify import verify_report
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.plotting import tsv
    from core.runtime.tracking import Tracker

    try:
        eps_list = [float(e) for e in eps.split(",") if e.strip()]
    except ValueError:
        eps_list = []
    if not eps_list or any(e <= 0 for e in eps_list):
        raise UserError(f"--eps must be comma-separated radii > 0, e.g. 0.01,0.03; got '{eps}'")
    norm_list = [n.strip() for n in norms.split(",") if n.strip()]
    if not norm_list or any(n not in ("inf", "2") for n in norm_list):
        raise UserError(f"--norms must be a subset of inf,2; got '{norms}'")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_list or any(m not in ("IBP", "CROWN", "alpha-CROWN") for m in method_list):
        raise UserError(f"--methods must be a subset of IBP,CROWN,alpha-CROWN; got '{methods}'")
    if samples < 1:
        raise UserError(f"--samples must be >= 1; got {samples}")
    data = _data(cfg)
    with user_errors():
        target = target_from_config(cfg, data)
    if target.white_box is None:
        target.close()
        raise UserError("verify needs the classifier's weights (auto-LiRPA is white-box): give a checkpoint "
                        "as --target, not a query-only program or server")
    models = {"classifier": target.white_box.eval()}
    if denoiser:
        state = load_checkpoint(denoiser, app="defense")
        if (state.get("app_state") or {}).get("ae_spec"):
            target.close()
            raise UserError(f"{denoiser} is a ZO-AE-DS denoiser: its decoder's transposed convolutions (padding 1) "
                            "are beyond auto-LiRPA 0.3; verify supports DnCNN denoisers (fo-ds, zo-ds)")
        with user_errors("denoiser checkpoint: "):
            models["denoised"] = nn.Sequential(front_from_checkpoint(state), target.white_box).eval()
    device = resolve_device(cfg.run.device)
    models = {name: m.to(device) for name, m in models.items()}
    x, y = data.test.x[:samples].to(device), data.test.y[:samples].to(device)
    try:
        with Tracker("defense", experiment=cfg.run.experiment, run_name="verify") as tr:
            rows = verify_report(models, x, y, eps_list, norm_list, method_list)
            tr.set_tags({"deepzero.verb": "verify"})
            tr.log_text(tsv(rows), "verify/verify.tsv")
            for r in rows:
                tr.log_metrics({f"verified_{r['model']}_{r['method']}_l{r['norm']}_eps{r['eps']:g}":
                                r["verified_accuracy"]})
    finally:
        target.close()
    print(tsv(rows), end="")
    return 0


# -- the main job -----------------------------------------------------------------------------------
def run_pipeline(cfg: DefenseConfig, *, methods: str, progress: bool) -> int:
    """Target → trainers → certification → one comparison (see the module docstring)."""
    from applications.certified_defense.certify import plot_curves
    from applications.certified_defense.train import DefenseExperiment, target_from_config
    from core.runtime.config import flatten
    from core.runtime.loop import run_experiment, run_sweep
    from core.runtime.plotting import tsv

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen or any(m not in ("fo-ds", "zo-ae-ds", "zo-ds") for m in chosen):
        raise UserError(f"--methods must be a subset of fo-ds,zo-ae-ds,zo-ds; got '{methods}'")
    data = _data(cfg)
    if cfg.target.source == "train":
        path, acc, _ = train_and_save_target(cfg)
        print(f"target: clean test accuracy {acc:.4f} ({path})", flush=True)
        cfg = copy.deepcopy(cfg)
        cfg.target.source = str(path)
    with user_errors():
        target = target_from_config(cfg, data)
    order = ["none"] + [m for m in ("fo-ds", "zo-ds", "zo-ae-ds") if m in chosen]
    cells = []
    for m in order:
        cell = copy.deepcopy(cfg)
        if m != "none":
            cell.optim.method = m
        cell.validate()
        cells.append((m, cell))
    spent: dict[str, float] = {}
    curves: dict[str, list] = {}

    def run_cell(name: str, cell: DefenseConfig, tracker) -> dict[str, Any]:
        start = time.perf_counter()
        row: dict[str, Any] = {"method": METHOD_LABELS[name]}
        front = None
        if name != "none":
            if name == "zo-ae-ds" and not cell.target.budget and "zo-ds" in spent:
                cell.target.budget = int(spent["zo-ds"])            # equal query budgets
                cell.optim.epochs = 10_000                          # the budget ends it
            exp = DefenseExperiment(cell, data=copy.deepcopy(data), target=target)
            out = run_experiment(exp, tracker, progress=progress)
            spent[name] = float(exp.queries)
            front = exp.front()
            row.update({"train_queries": exp.queries, "noisy_accuracy": out.history[-1]["noisy_accuracy"]
                        if out.history else float("nan"), "stopped": out.stopped or ""})
        else:
            tracker.log_params({k: v for k, v in flatten(cell).items() if k.startswith(("certify.", "target."))})
            row.update({"train_queries": 0, "noisy_accuracy": float("nan"), "stopped": ""})
        tsv_path = _default_path("certify", f"{tracker.run_id}.tsv")
        rows, metrics = certify_front(cell, target, front, data.test, tsv_path, progress=progress)
        tracker.log_metrics(metrics)
        tracker.log_artifact(tsv_path, "certify")
        curves[METHOD_LABELS[name]] = rows
        row.update(metrics)
        row["wall_time_s"] = time.perf_counter() - start
        print(_format_metrics(name, metrics) + f"  train queries {row['train_queries']:.3g}", flush=True)
        return row

    def summarize(parent, rows: list[dict[str, Any]]) -> None:
        parent.log_text(tsv(rows), "comparison/table.tsv")
        parent.log_figure(plot_curves(curves, cfg.certify.sigma, f"{cfg.data.name}, σ = {cfg.certify.sigma:g}"),
                          "comparison/certified_accuracy_vs_radius.png")
        for r in rows:
            key = r["cell"]
            parent.log_metrics({f"{k}_{key}": v for k, v in r.items() if k.startswith(("certified_accuracy", "acr"))})

    try:
        parent_id, rows = run_sweep("defense", cells, run_cell, name="defense-run", experiment=cfg.run.experiment,
                                    params=flatten(cfg), summarize=summarize)
    finally:
        target.close()
    print(tsv([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items() if k != "run_id"}
               for r in rows]), end="")
    print(f"defense run {parent_id} (children: {len(rows)})")
    return 0
