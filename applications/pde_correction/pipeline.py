"""``deepzero pde evaluate`` and the main job ``deepzero pde run``.

``run``: generate (or reuse) the reference data → train every mode on the shared loop (one MLflow
child run per mode under one parent) → evaluate all of them on long rollouts of the held-out
conditions → one table, the MAE-vs-step plot, snapshots and a rollout GIF on the parent run.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from applications.pde_correction.config import PDEConfig
from core.runtime.errors import UserError

#: the cells of ``run``: a label -> (train.mode, optim.method)
CELLS = {"src": ("src", None), "non": ("non", "fo"), "unrolled-net": ("unrolled-net", "fo"),
         "zo-sol-cge": ("zo-sol", "zo-cge"), "zo-sol-rge": ("zo-sol", "zo-rge"), "zo-sol-mezo": ("zo-sol", "zo-mezo"),
         "fo-sol": ("fo-sol", "fo")}


class EvaluationStopped(UserError):
    """The solver failed (or a corrector diverged) during an evaluation: one line, exit status 1."""

    exit_code = 1


@contextmanager
def _evaluation_guard(what: str):
    from applications.pde_correction.rollout import SolverFailed
    from core.runtime.errors import TrainingDiverged

    try:
        yield
    except (SolverFailed, TrainingDiverged) as exc:
        raise EvaluationStopped(f"{what} stopped: {exc}") from None


def parse_cells(text: str) -> list[str]:
    cells = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        raise UserError(f"--modes: unknown mode '{bad[0] if bad else text}'; allowed: {', '.join(CELLS)}")
    return cells


def cell_config(cfg: PDEConfig, label: str) -> PDEConfig:
    mode, method = CELLS[label]
    train = dataclasses.replace(cfg.train, mode=mode)
    optim = dataclasses.replace(cfg.optim, method=method or cfg.optim.method)
    out = dataclasses.replace(cfg, train=train, optim=optim)
    out.validate()
    return out


def _horizon(cfg: PDEConfig) -> tuple[int, int]:
    frames = min(cfg.evaluate.gif_frames, cfg.evaluate.horizon + 1)
    return cfg.evaluate.horizon, frames


DEFAULT_CELLS = "src,non,unrolled-net,zo-sol-cge,zo-sol-rge,fo-sol"


def run_pipeline(cfg: PDEConfig, *, cells: str | None = None, progress: bool = True) -> int:
    from applications.pde_correction.data import generate
    from applications.pde_correction.evaluate import evaluate_models, log_evaluation
    from applications.pde_correction.train import PDEExperiment, Problem
    from core.runtime.config import flatten
    from core.runtime.errors import user_errors
    from core.runtime.loop import run_experiment, run_sweep
    from core.runtime.plotting import tsv

    if cells is None:
        cells = DEFAULT_CELLS if cfg.solver.source == "burgers" else DEFAULT_CELLS.replace(",fo-sol", "")
        if cfg.solver.source != "burgers":
            print(f"fo-sol left out: '{cfg.solver.source}' has no differentiable twin here", flush=True)
    labels = parse_cells(cells)
    if "fo-sol" in labels and cfg.solver.source != "burgers":
        raise UserError(f"fo-sol needs a differentiable twin of the solver, which exists for 'burgers' only; drop "
                        f"fo-sol from --modes for '{cfg.solver.source}'")
    configs = {label: cell_config(cfg, label) for label in labels if CELLS[label][0] != "src"}
    t0 = time.perf_counter()
    with user_errors():
        data = generate(cfg, progress=progress)
        problem = Problem(cfg, data, progress=progress)
    print(f"data: {data.path} ({len(data.train)} train / {len(data.test)} test simulations, "
          f"{data.train.frames.shape[1] - 1} steps each; {time.perf_counter() - t0:.0f} s)", flush=True)
    models: dict[str, Any] = {}
    horizon, kept_frames = _horizon(cfg)

    def run_cell(label: str, cell_cfg, tracker) -> dict[str, Any]:
        if label == "src":
            tracker.log_params(flatten(cfg))
            tracker.set_tags({"mode": "src", "family": cfg.solver.family, "solver": cfg.solver.source})
            models["src"] = None
            return {"train_wall_s": 0.0, "train_queries": 0}
        with user_errors():
            exp = PDEExperiment(cell_cfg, problem=problem, progress=progress)
        print(f"[{label}] {exp.summary()}", flush=True)
        out = run_experiment(exp, tracker, progress=progress, save_checkpoints=True,
                             on_epoch=lambda row: print(f"[{label}] epoch {row['epoch']}: loss "
                                                        f"{row.get('train_loss', float('nan')):.3g}, mae "
                                                        f"{row['mae']:.4g}", flush=True))
        if out.stopped is not None:
            print(f"[{label}] stopped: {out.stopped}", file=sys.stderr, flush=True)
        models[label] = exp.model
        return {"train_wall_s": round(exp.wall, 1), "train_queries": exp.queries,
                "params": sum(p.numel() for p in exp.model.parameters()), "stopped": out.stopped or ""}

    def summarize(parent, rows: list[dict[str, Any]]) -> None:
        ordered = {label: models[label] for label in labels if label in models}
        with _evaluation_guard("the final evaluation"):
            table, errors, kept = evaluate_models(problem, ordered, horizon=horizon, sims=cfg.evaluate.sims,
                                                  frames_kept=kept_frames, progress=progress)
        by_label = {r["cell"]: r for r in rows}
        for r in table:
            r.update({k: by_label[r["mode"]].get(k, "") for k in ("train_wall_s", "train_queries", "stopped")})
        log_evaluation(parent, problem, table, errors, kept, horizon=horizon, frames_kept=kept_frames,
                       title=f"{cfg.solver.family}: MAE over {horizon}-step rollouts of held-out conditions",
                       workdir=Path(data.path) / "plots" / parent.run_id)
        print(tsv(table), end="")
        summary.extend(table)

    summary: list[dict[str, Any]] = []
    try:
        parent_id, _ = run_sweep("pde", [(label, configs.get(label)) for label in labels], run_cell,
                                 name=f"run-{cfg.solver.family}", params=flatten(cfg),
                                 experiment=cfg.run.experiment, summarize=summarize)
    finally:
        problem.close()
    print(f"total {time.perf_counter() - t0:.0f} s; browse: deepzero ui   (parent run {parent_id})")
    stopped = [r["mode"] for r in summary if r.get("stopped")]
    if stopped:
        print(f"stopped early (their rows use the weights they had when they stopped): {', '.join(stopped)}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def evaluate_command(cfg: PDEConfig, checkpoints: list[str], *, progress: bool = True,
                     evaluate_from_checkpoint: list[str] | None = None) -> int:
    """Evaluate ``src`` and/or corrector checkpoints on long rollouts in one MLflow run.

    With ``evaluate_from_checkpoint`` (a list of ``evaluate.*`` overrides, possibly empty) the first
    checkpoint's ``evaluate`` block is used (its horizon fits its data) with those overrides on top;
    with None, ``cfg``'s.
    """
    from applications.pde_correction.evaluate import evaluate_models, log_evaluation
    from applications.pde_correction.train import Problem
    from core.models import from_spec
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.config import build_config, flatten
    from core.runtime.errors import user_errors
    from core.runtime.plotting import tsv
    from core.runtime.tracking import Tracker

    if not checkpoints:
        raise UserError("evaluate: give 'src' and/or checkpoints of 'deepzero pde train'")
    models: dict[str, Any] = {}
    base = cfg
    for item in checkpoints:
        if item == "src":
            models["src"] = None
            continue
        state = load_checkpoint(item, app="pde")
        saved = build_config(PDEConfig, base=state["config"])
        if base is cfg:
            evaluate = cfg.evaluate
            if evaluate_from_checkpoint is not None:
                evaluate = build_config(PDEConfig, base=state["config"], overrides=evaluate_from_checkpoint).evaluate
            base = dataclasses.replace(cfg, solver=saved.solver, data=saved.data,
                                       run=dataclasses.replace(cfg.run, seed=saved.run.seed), evaluate=evaluate)
        elif saved.solver != base.solver or saved.data != base.data:
            raise UserError(f"{item} was trained on other data/solver settings than {checkpoints[0]}; evaluate "
                            "checkpoints of one dataset together")
        label = saved.train.mode + (f"-{saved.optim.method[3:]}" if saved.train.mode == "zo-sol" else "")
        if label in models:
            label += f"-{sum(1 for k in models if k == label or k.startswith(label + '-')) + 1}"
        with user_errors(f"{item}: "):
            models[label] = from_spec(state["model_spec"], state["model"]).double()
    base.validate()
    horizon, kept_frames = _horizon(base)
    with user_errors():
        from applications.pde_correction.data import generate

        problem = Problem(base, generate(base, progress=progress), progress=progress)
    try:
        with _evaluation_guard("evaluate"):
            table, errors, kept = evaluate_models(problem, models, horizon=horizon, sims=base.evaluate.sims,
                                                  frames_kept=kept_frames, progress=progress)
        with Tracker("pde", experiment=base.run.experiment, run_name="evaluate") as tr:
            tr.log_params({**flatten(base), "checkpoints": ",".join(checkpoints)})
            tr.set_tags({"deepzero.kind": "evaluation"})
            log_evaluation(tr, problem, table, errors, kept, horizon=horizon, frames_kept=kept_frames,
                           title=f"{base.solver.family}: MAE over {horizon}-step rollouts",
                           workdir=Path(problem.data.path) / "plots" / tr.run_id)
            run_id = tr.run_id
    finally:
        problem.close()
    print(tsv(table), end="")
    print(f"browse: deepzero ui   (run {run_id})")
    return 0


def generate_command(cfg: PDEConfig, *, progress: bool = True) -> int:
    from applications.pde_correction.data import generate
    from core.runtime.errors import user_errors

    t0 = time.perf_counter()
    with user_errors():
        data = generate(cfg, progress=progress)
    m = data.manifest
    print(f"{data.path}: {len(data.train)} train / {len(data.test)} test simulations of {m['steps']} steps "
          f"(spin-up {m['spinup']}), reference {m['reference']} {m['reference_options']} → source "
          f"{list(data.train.frames.shape[2:])}; {time.perf_counter() - t0:.0f} s")
    return 0

