"""Long-rollout evaluation of correctors against the down-sampled reference, with plots and a GIF.

Every model (``None`` = the source solver alone, SRC) rolls each test simulation ``horizon`` steps
from its first kept reference frame; the error is the mean absolute difference to the reference per
step. Reported per mode: MAE over simulations and steps with its standard error over simulations,
and the MAE at the last step. Plots: MAE vs step (mean ± standard error band), snapshots of one
simulation (reference, source, each corrected mode), and an animated GIF of that rollout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from applications.pde_correction.rollout import rollout_errors
from applications.pde_correction.train import Problem, summarize_errors
from core.runtime.errors import TrainingDiverged


def evaluate_models(problem: Problem, models: dict[str, Any], *, horizon: int, sims: int = 0,
                    frames_kept: int = 0, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, np.ndarray],
                                                                            dict[str, list[np.ndarray]]]:
    """Roll out each model; returns table rows, per-mode error arrays [S, horizon] and kept states."""
    from tqdm import tqdm

    frames, cond, planes = problem.test_subset(sims)
    rows, errors, kept = [], {}, {}
    for label, model in tqdm(models.items(), desc="evaluate", disable=not progress, leave=False):
        if model is not None:
            model.eval()
        try:
            err, states = rollout_errors(model, problem.solver, problem.family, frames, cond, planes, horizon,
                                         keep=frames_kept)
        except TrainingDiverged as exc:              # one unstable corrector must not cost the whole table
            rows.append({"mode": label, "mae": float("inf"), "mae_sem": float("nan"), "mae_final": float("inf"),
                         "sims": len(frames), "horizon": horizon, "note": f"diverged: {exc}"})
            continue
        errors[label], kept[label] = err, states
        rows.append({"mode": label, **{k: round(v, 6) for k, v in summarize_errors(err).items()},
                     "sims": len(frames), "horizon": horizon, "note": ""})
    return rows, errors, kept


def plot_errors(errors: dict[str, np.ndarray], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, err in errors.items():
        steps = np.arange(1, err.shape[1] + 1)
        mean = err.mean(0)
        sem = err.std(0, ddof=1) / np.sqrt(len(err)) if len(err) > 1 else np.zeros_like(mean)
        ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - sem, mean + sem, alpha=0.2)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("MAE vs reference")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _vorticity(family, state: np.ndarray) -> np.ndarray:
    """Cell-centred vorticity ∂v_y/∂x − ∂v_x/∂y (grid units) of a wake state."""
    import torch

    f = family.to_field(torch.from_numpy(state[None]))[0].numpy()          # [2, nx, ny]
    return np.gradient(f[1], axis=0) - np.gradient(f[0], axis=1)


def _draw(ax, family, state: np.ndarray, label: str, lim: float | None = None) -> None:
    if family.name == "wake":
        w = _vorticity(family, state)
        ax.imshow(w.T, origin="lower", cmap="RdBu_r", vmin=-(lim or 1), vmax=(lim or 1))
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.plot(np.arange(len(state)), state, label=label)
    ax.set_title(label, fontsize=8)


def plot_snapshots(family, reference: list[np.ndarray], kept: dict[str, list[np.ndarray]], steps: list[int],
                   path: Path) -> Path:
    """One simulation at a few steps: reference, source and every corrected mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = np.linspace(0, len(steps) - 1, min(4, len(steps))).round().astype(int)
    labels = ["reference", *kept]
    if family.name == "wake":
        lim = max(float(np.abs(_vorticity(family, reference[i])).max()) for i in pick) or 1.0
        fig, axes = plt.subplots(len(pick), len(labels), figsize=(1.6 * len(labels), 2.8 * len(pick)), squeeze=False)
        for r, i in enumerate(pick):
            for c, label in enumerate(labels):
                state = reference[i] if label == "reference" else kept[label][i]
                _draw(axes[r, c], family, state, f"{label}, step {steps[i]}", lim)
    else:
        fig, axes = plt.subplots(len(pick), 1, figsize=(7, 2.2 * len(pick)), squeeze=False)
        for r, i in enumerate(pick):
            ax = axes[r, 0]
            ax.plot(reference[i], "k-", lw=2, label="reference")
            for label in kept:
                ax.plot(kept[label][i], label=label, lw=1)
            ax.set_title(f"step {steps[i]}", fontsize=9)
        axes[0, 0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rollout_gif(family, reference: list[np.ndarray], kept: dict[str, list[np.ndarray]], steps: list[int],
                path: Path) -> Path:
    """An animated GIF of one simulation's rollout: reference next to every mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    labels = ["reference", *kept]
    if family.name == "wake":
        lim = float(np.abs(_vorticity(family, reference[0])).max()) or 1.0
        fig, axes = plt.subplots(1, len(labels), figsize=(1.6 * len(labels), 3.2))

        def frame(i):
            for ax, label in zip(axes, labels):
                ax.clear()
                _draw(ax, family, reference[i] if label == "reference" else kept[label][i], label, lim)
            fig.suptitle(f"step {steps[i]}", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(6, 3))
        lo = min(float(np.min(s)) for s in reference) * 1.1
        hi = max(float(np.max(s)) for s in reference) * 1.1

        def frame(i):
            ax.clear()
            ax.plot(reference[i], "k-", lw=2, label="reference")
            for label in kept:
                ax.plot(kept[label][i], lw=1, label=label)
            ax.set_ylim(lo, hi)
            ax.set_title(f"step {steps[i]}", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
    anim = FuncAnimation(fig, frame, frames=len(steps))
    anim.save(str(path), writer=PillowWriter(fps=8))
    plt.close(fig)
    return path


def log_evaluation(tracker, problem: Problem, rows, errors, kept, *, horizon: int, frames_kept: int,
                   title: str, workdir: Path) -> None:
    """Table, error plot, snapshots and GIF as artifacts of ``tracker``'s run; metrics per mode."""
    from core.runtime.plotting import tsv

    workdir.mkdir(parents=True, exist_ok=True)
    tracker.log_text(tsv(rows), "evaluation/mae.tsv")
    metrics = {}
    for r in rows:
        if r.get("note"):
            continue                                   # a diverged mode: no finite metrics to log
        key = r["mode"].replace("/", "_")
        metrics.update({f"mae_{key}": r["mae"], f"mae_sem_{key}": r["mae_sem"], f"mae_final_{key}": r["mae_final"]})
    tracker.log_metrics(metrics, step=0)
    if not errors:
        return
    tracker.log_artifact(plot_errors(errors, workdir / "mae_vs_step.png", title), "evaluation")
    if frames_kept and kept:
        steps = np.linspace(0, horizon, frames_kept).round().astype(int).tolist()
        reference = [problem.data.test.frames[0, t] for t in steps]
        tracker.log_artifact(plot_snapshots(problem.family, reference, kept, steps, workdir / "snapshots.png"),
                             "evaluation")
        tracker.log_artifact(rollout_gif(problem.family, reference, kept, steps, workdir / "rollout.gif"),
                             "evaluation")
