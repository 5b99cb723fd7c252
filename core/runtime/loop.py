"""The one experiment loop every application runs: config → MLflow run → epochs → checkpoint → resume.

:func:`run_experiment` trains an :class:`~core.runtime.experiment.Experiment` identically for every
app: params, tags and ``config.yaml`` on a new run; per-step and per-epoch metrics in batches;
after every epoch an atomic checkpoint of the whole run state (:meth:`Experiment.state_dict`); a
history table and plots at the end. ``--resume`` continues the same MLflow run and reaches bit for
bit what an uninterrupted run reaches; metric points the interrupted process already sent are not
sent twice. :func:`resume_config` decides which config changes a resume may make, and
:func:`run_sweep` runs a grid of cells as child runs of one parent run.

Errors an app lists in :attr:`Experiment.stop_errors` (a query budget running out, a solver
failing), training diverging and a lost or disagreeing rank end the run cleanly: the last epoch's
checkpoint is kept and the reason is reported in one line. Ctrl-C prints the exact resume command.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.runtime.errors import TrainingDiverged, UserError
from core.runtime.experiment import Experiment
from core.runtime.plotting import log_history_plots, tsv


def checkpoint_path(exp: Experiment, run_id: str) -> Path:
    from core.runtime.tracking import project_root

    base = Path(exp.cfg.run.checkpoint_dir or f"runs/{exp.app}")
    if not base.is_absolute():
        base = project_root() / base
    return base / run_id / "checkpoint.pt"


class _MetricGate:
    """Drops metric points a resumed run already sent (same key, step ≤ the last one logged)."""

    def __init__(self, tracker, resumed: bool) -> None:
        self.tracker, self.last = tracker, {}
        if resumed and getattr(tracker, "client", None) is not None:   # a NullTracker (ranks > 0) logs nothing
            run = tracker.client.get_run(tracker.run_id)
            for key in run.data.metrics:
                hist = tracker.client.get_metric_history(tracker.run_id, key)
                self.last[key] = max((m.step for m in hist), default=-1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.last.get(k, -1)}
        if fresh:
            self.tracker.log_metrics(fresh, step=step)


@dataclass
class RunResult:
    history: list[dict[str, float]]
    checkpoint: Path | None
    run_id: str
    stopped: str | None = None                     # why a stop error ended the run early
    extra: dict[str, Any] = field(default_factory=dict)


def _epoch(exp: Experiment, gate: _MetricGate, progress: bool) -> dict[str, float]:
    from tqdm import tqdm

    start = time.perf_counter()
    sums: dict[str, float] = {}
    n = 0
    bar = tqdm(total=exp.steps_per_epoch(), desc=f"epoch {exp.epoch + 1}/{exp.total_epochs}",
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for batch in exp.batches(exp.epoch):
            out = exp.train_step(batch)
            exp.step += 1
            n += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            gate.log({f"step_{k}": v for k, v in out.items()}, step=exp.step)
            bar.update(1)
            bar.set_postfix(loss=f"{out.get('loss', float('nan')):.3f}", queries=f"{exp.queries:.3g}")
    finally:
        exp.wall += time.perf_counter() - start
        bar.close()
    start = time.perf_counter()
    evaluation = exp.evaluate()
    exp.wall += time.perf_counter() - start
    exp.epoch += 1
    row = {"epoch": exp.epoch, **{f"train_{k}": v / max(1, n) for k, v in sums.items()}, **evaluation,
           "queries": float(exp.queries), "wall_time_s": exp.wall}
    if exp.optimizer is not None:
        row["lr"] = exp.optimizer.param_groups[0]["lr"]
    exp.history.append(row)
    return row


def run_experiment(exp: Experiment, tracker, *, progress: bool = True, save_checkpoints: bool = True,
                   on_epoch: Callable[[dict[str, float]], None] | None = None,
                   resume_command: str | None = None, sync: Callable[[], None] | None = None) -> RunResult:
    """Train (or continue) ``exp`` inside the open MLflow run ``tracker``; see the module docstring.

    Args:
        save_checkpoints: write the checkpoint after every epoch (sweeps' cells turn it off).
        on_epoch: called with each epoch's history row (the CLI prints it).
        sync: called before each epoch's steps; a multi-process run waits there for every rank
            (rank 0 alone logs and checkpoints, so the step collectives need not wait for that).
        resume_command: the command that resumes this run, printed on Ctrl-C and early stops
            (``{checkpoint}`` is replaced by the checkpoint path).
    """
    from core.collectives import RankLost
    from core.distributed import RanksDisagree
    from core.runtime.checkpoint import save_checkpoint
    from core.runtime.config import flatten, to_yaml

    run_id = tracker.run_id
    ckpt = checkpoint_path(exp, run_id) if save_checkpoints else None
    resumed = exp.resume is not None
    if not resumed:
        tracker.log_params(flatten(exp.cfg))
        tracker.set_tags({"seed": exp.cfg.run.seed, **exp.tags()})
        tracker.log_text(to_yaml(exp.cfg), "config.yaml")
        exp.start_artifacts(tracker)
    gate = _MetricGate(tracker, resumed)
    stopped = None
    saved_epoch = exp.epoch if resumed else None         # the epoch the checkpoint on disk holds

    def how_to_resume(diverged: bool = False) -> str:
        if ckpt is None:
            return "this run keeps no checkpoint"
        if saved_epoch is None or not ckpt.is_file():
            return "no epoch had finished, so there is no checkpoint to resume"
        if diverged:
            return (f"the checkpoint of epoch {saved_epoch} is kept, but resuming it would diverge again: "
                    "start a new run with a lower optim.lr (or zo.mu)")
        cmd = (resume_command or "--resume {checkpoint}").format(checkpoint=shlex.quote(str(ckpt)))
        env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("DEEPZERO_HOME", "MLFLOW_TRACKING_URI")
                       if os.environ.get(k))
        return f"the checkpoint of epoch {saved_epoch} is kept; resume with:\n  {env + ' ' if env else ''}{cmd}"

    def keep_spent_queries() -> None:
        """Queries spent after the last checkpoint stay spent: record them in it (atomically)."""
        if ckpt is None or saved_epoch is None or not ckpt.is_file():
            return
        from core.runtime.checkpoint import load_checkpoint

        state = load_checkpoint(ckpt, app=exp.app)
        boxes = exp.blackboxes()
        for name, saved in (state.get("blackboxes") or {}).items():
            if name in boxes:
                saved["lost"] = int(saved.get("lost", 0)) + max(0, int(boxes[name].queries) - int(saved["queries"]))
        save_checkpoint(ckpt, state)

    try:
        while exp.epoch < exp.total_epochs:
            if sync is not None:
                sync()
            row = _epoch(exp, gate, progress)
            gate.log({k: v for k, v in row.items() if k != "epoch"}, step=exp.epoch)
            tracker.flush()
            if ckpt is not None:
                save_checkpoint(ckpt, exp.state_dict(run_id))
                saved_epoch = exp.epoch
            if on_epoch:
                on_epoch(row)
    except KeyboardInterrupt:
        tracker.flush()
        keep_spent_queries()
        print(f"\ninterrupted during epoch {exp.epoch + 1}: {how_to_resume()}", file=sys.stderr, flush=True)
        raise
    except exp.stop_errors + (TrainingDiverged, RankLost, RanksDisagree) as exc:
        tracker.flush()
        keep_spent_queries()
        stopped = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        tracker.set_tags({"deepzero.stop_reason": stopped})
        diverged = isinstance(exc, TrainingDiverged)
        shared = isinstance(exc, (TrainingDiverged, RanksDisagree))    # every rank of a group stops alike
    else:
        if resumed:
            tracker.delete_tag("deepzero.stop_reason")
    if ckpt is not None and ckpt.is_file():
        tracker.log_artifact(ckpt, "checkpoints")
    if exp.history:
        tracker.log_text(tsv(exp.history), "history.tsv")
        if exp.plot_metric:
            log_history_plots(tracker, exp.history, exp.plot_metric, exp.run_name())
    exp.final_artifacts(tracker)
    result = RunResult(exp.history, ckpt, run_id, stopped)
    if stopped is not None:
        result.extra["resume_hint"] = how_to_resume(diverged)
        result.extra["every_rank"] = shared
    return result


# -- resume: which config changes are allowed ----------------------------------------------------------
def resume_config(schema: type, saved: dict[str, Any], *, config_file: str | None = None,
                  overrides: Sequence[str] = (), safe_keys: Sequence[str] = ()) -> Any:
    """The checkpoint's config with the changes a resume may make; any other change is refused.

    ``safe_keys`` (plus :data:`core.runtime.blocks.RESUME_SAFE_KEYS`) may change — e.g. more
    epochs or a new data root; every other key given by ``--config`` or ``--set`` must equal the
    checkpoint's value, or this raises a one-line :class:`UserError` naming the key.
    """
    from core.runtime.blocks import RESUME_SAFE_KEYS
    from core.runtime.config import build_config, flatten

    cfg = build_config(schema, base=saved, config_file=config_file, overrides=overrides)
    before, after = flatten(build_config(schema, base=saved)), flatten(cfg)
    allowed = set(RESUME_SAFE_KEYS) | set(safe_keys)
    changed = [k for k in after if after[k] != before.get(k)]
    refused = [k for k in changed if k not in allowed]
    if refused:
        k = refused[0]
        raise UserError(f"--resume cannot change '{k}' (checkpoint: {before.get(k)!r}, asked: {after[k]!r}); "
                        f"keys a resume may change: {', '.join(sorted(allowed))}")
    return cfg


# -- sweeps: one parent run, a child run per cell ------------------------------------------------------
def run_sweep(app: str, cells: Sequence[tuple[str, Any]], run_cell: Callable[[str, Any, Any], dict[str, Any]], *,
              name: str = "sweep", params: dict[str, Any] | None = None, experiment: str | None = None,
              summarize: Callable[[Any, list[dict[str, Any]]], None] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Run every ``(cell name, cell config)`` as a child of one parent MLflow run.

    ``run_cell(name, cfg, child_tracker) -> result row``; the rows are logged as ``sweep/cells.tsv``
    on the parent, then ``summarize(parent_tracker, rows)`` logs tables and plots. Returns
    ``(parent run id, rows)``.
    """
    from core.runtime.tracking import Tracker

    rows: list[dict[str, Any]] = []
    with Tracker(app, experiment=experiment, run_name=name) as parent:
        if params:
            parent.log_params(params)
        parent.set_tags({"deepzero.sweep": "parent", "deepzero.cells": len(cells)})
        for cell_name, cell_cfg in cells:
            with Tracker(app, experiment=experiment, run_name=cell_name, parent_run_id=parent.run_id) as child:
                row = run_cell(cell_name, cell_cfg, child)
            rows.append({"cell": cell_name, **row, "run_id": child.run_id})
        if rows:
            parent.log_text(tsv(rows), "sweep/cells.tsv")
        if summarize is not None:
            summarize(parent, rows)
    return parent.run_id, rows
