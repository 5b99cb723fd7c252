"""The one experiment loop every application runs: config → MLflow run → epochs → checkpoint → resume.

An application subclasses :class:`Experiment` and supplies what is its own — building its objects
from the config, the batches of an epoch, one training step and an evaluation::

    class MyExperiment(Experiment):
        app = "myapp"

        def __init__(self, cfg, *, resume=None):
            super().__init__(cfg, resume=resume)
            self.model = ...; self.optimizer, self.scheduler = make_optimizer(...)
            self.estimator = make_estimator(...)

        def batches(self, epoch): ...               # iterable of whatever train_step takes
        def train_step(self, batch): return {"loss": self.optimize(loss_fn, x, y)}
        def evaluate(self): return {"test_mse": ...}

:func:`run_experiment` does the rest, identically for every app: params, tags and ``config.yaml``
on a new run; per-step and per-epoch metrics in batches; after every epoch an atomic checkpoint of
the whole run state (model, optimizer, scheduler, estimator, sparsity plan, every ``BlackBox``'s
query counter, RNG states, history, wall time, the app's own state); a history table and plots at
the end. ``--resume`` continues the same MLflow run and reaches bit for bit what an uninterrupted
run reaches; metric points the interrupted process already sent are not sent twice.

Errors listed in :attr:`Experiment.stop_errors` (a query budget running out, a solver failing,
training diverging) end the run cleanly: the last epoch's checkpoint is kept and the reason is
reported in one line. Ctrl-C prints the exact resume command.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.runtime.errors import UserError


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@contextmanager
def user_errors(what: str = ""):
    """Turn the library's ValueError/OSError into one-line :class:`UserError`.

    Wrap only code that consumes user input (building data, models and estimators from a config),
    where such an exception means a bad value or a missing file, not a bug (other exceptions keep
    their traceback).
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what}{text}") from None


class Experiment:
    """One training run of an application: the objects it trains and the state a checkpoint restores.

    Attributes the runtime saves and restores when set: ``model``, ``optimizer``, ``scheduler``,
    ``estimator``, ``plan`` (a sparsity plan) and ``ratios``; every :class:`core.BlackBox` inside
    ``model`` or returned by :meth:`blackboxes` has its query counter saved too. Put anything else
    a resume needs in :meth:`app_state` / :meth:`load_app_state`.

    Args:
        cfg: the app's resolved config (with the shared ``optim`` and ``run`` blocks).
        resume: the checkpoint being resumed (None for a new run); use it to reuse state that is
            expensive or random to rebuild (e.g. ``resume["ratios"]`` instead of recomputing ZO-GraSP).
    """

    app: str = ""
    stop_errors: tuple[type[BaseException], ...] = ()
    plot_metric: str | None = None                 # metric plotted against epoch, queries and wall time

    def __init__(self, cfg: Any, *, resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.resume = cfg, resume
        self.model = self.optimizer = self.scheduler = self.estimator = self.plan = None
        self.ratios: dict[str, float] | None = None
        self.model_spec: dict[str, Any] | None = None
        self.epoch, self.step, self.fo_queries, self.wall = 0, 0, 0, 0.0
        self.history: list[dict[str, float]] = []
        self._lost: dict[str, int] = {}            # black-box queries spent past the last checkpoint

    # An estimator assigned at any time (a lazily built one, one rebuilt mid-run) passes through
    # ``on_estimator`` when set: a multi-process run gives every CGE its shard there.
    lazy_cge_methods: tuple[str, ...] = ()        # optim.method values whose CGE is built after the start
    on_estimator: Any = None
    # Why this app cannot run on several processes ("" = it can): e.g. a black box it asks outside the
    # estimator would be asked again by every rank, and its queries and budget counted per process.
    single_process_reason: str = ""

    @property
    def estimator(self) -> Any:
        return self.__dict__.get("_estimator")

    @estimator.setter
    def estimator(self, est: Any) -> None:
        if est is not None and self.on_estimator is not None:
            self.on_estimator(est)                 # may refuse it: then it is not assigned
        self.__dict__["_estimator"] = est

    # -- what an app supplies --------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return int(self.cfg.optim.epochs)

    def batches(self, epoch: int) -> Iterable[Any]:
        raise NotImplementedError

    def steps_per_epoch(self) -> int | None:
        return None

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step; returns metrics, ``loss`` first (logged per step as ``step_loss``)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def run_name(self) -> str:
        return self.app

    def summary(self) -> str:
        """One line printed when the run starts."""
        return f"{self.app}: {self.total_epochs} epochs"

    def tags(self) -> dict[str, Any]:
        return {}

    def blackboxes(self) -> dict[str, Any]:
        """Query-only stages whose counters a checkpoint keeps (default: those inside ``model``)."""
        from core.blackbox import BlackBox

        if self.model is None:
            return {}
        return {name or "model": m for name, m in self.model.named_modules() if isinstance(m, BlackBox)}

    def start_artifacts(self, tracker) -> None:
        """Artifacts logged once when a new run starts (e.g. sparsity ratios)."""

    def final_artifacts(self, tracker) -> None:
        """Artifacts logged when the run ends (the runtime already logs history and its plots)."""

    def app_state(self) -> dict[str, Any]:
        return {}

    def load_app_state(self, state: dict[str, Any]) -> None:
        pass

    # -- shared helpers ----------------------------------------------------------------------------
    @property
    def queries(self) -> int:
        """Per-sample model evaluations so far (the estimator's count, or the FO forwards)."""
        return int(self.estimator.queries) if self.estimator is not None else self.fo_queries

    def optimize(self, loss_fn: Callable, x=None, y=None) -> float:
        """One step of ``optimizer`` on ``loss_fn``: ZO (``estimator``) or backprop when it is None.

        Supervised ``loss_fn(model(x), y)`` or a general objective ``loss_fn(model)``. Steps the
        scheduler and the sparsity plan; a non-finite loss raises :class:`TrainingDiverged`
        before the optimizer moves.
        """
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        if self.estimator is None:
            loss = loss_fn(self.model(x), y) if x is not None else loss_fn(self.model)
            loss.backward()
            self.fo_queries += int(x.shape[0]) if x is not None else int(getattr(loss_fn, "queries", 1))
        else:
            loss = self.estimator.backward(loss_fn, x, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged (loss {float(loss)}) at step {self.step}: lower optim.lr "
                                   "or zo.mu")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.plan is not None:
            self.plan.step()
        return float(loss.detach())

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self, run_id: str | None) -> dict[str, Any]:
        from core.runtime.seeding import get_rng_state

        def sd(obj):
            return obj.state_dict() if obj is not None else None

        return {"app": self.app, "config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "step": self.step,
                "model": sd(self.model), "model_spec": self.model_spec, "optimizer": sd(self.optimizer),
                "scheduler": sd(self.scheduler), "estimator": sd(self.estimator), "plan": sd(self.plan),
                "ratios": self.ratios, "rng": get_rng_state(), "history": self.history, "wall_time_s": self.wall,
                "fo_queries": self.fo_queries, "mlflow_run_id": run_id,
                "blackboxes": {n: {**b.query_state(), "lost": self._lost.get(n, 0)}
                               for n, b in self.blackboxes().items()},
                "app_state": self.app_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from core.runtime.seeding import set_rng_state

        try:
            for key in ("model", "optimizer", "scheduler", "estimator", "plan"):
                obj = getattr(self, key)
                if obj is not None and state.get(key) is not None:
                    obj.load_state_dict(state[key])
                elif (obj is None) != (state.get(key) is None):
                    raise ValueError(f"the checkpoint {'lacks' if obj is not None else 'has'} a {key} state")
            boxes = self.blackboxes()
            saved = state.get("blackboxes") or {}
            if set(saved) != set(boxes):
                raise ValueError(f"black boxes differ: checkpoint {sorted(saved)}, model {sorted(boxes)}")
            for name, box in boxes.items():
                # the counter continues from the checkpoint; queries spent after it (an interrupted
                # epoch, an earlier failed resume) stay spent: they come off the config's budget
                box.load_query_state(saved[name], budget=False)
                self._lost[name] = int(saved[name].get("lost", 0))
                if box.budget is not None:
                    box.budget = max(0, box.budget - self._lost[name])
            self.load_app_state(state.get("app_state") or {})
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"checkpoint does not match this config/model: {str(exc).splitlines()[0][:200]}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history, self.wall = list(state["history"]), float(state["wall_time_s"])
        self.fo_queries = int(state.get("fo_queries", 0))
        set_rng_state(state["rng"])


# -- tables and plots -------------------------------------------------------------------------------
def tsv(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as a tab-separated table with a header (columns from the first row)."""
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, delimiter="\t", lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def log_history_plots(tracker, history: Sequence[dict[str, float]], metric: str, title: str,
                      prefix: str = "plots") -> None:
    """``metric`` against epoch, queries and wall time, as PNG artifacts ``<prefix>/<metric>_vs_*.png``."""
    from core.runtime.plotting import line_plot

    history = [h for h in history if metric in h]
    if not history:
        return
    ys = [h[metric] for h in history]
    stem = "accuracy" if metric == "test_accuracy" else metric
    for key, label in (("epoch", "epoch"), ("queries", "queries (per-sample evaluations)"),
                       ("wall_time_s", "wall time (s)")):
        if key not in history[0]:
            continue
        name = "wall_time" if key == "wall_time_s" else key
        fig = line_plot({title: ([h[key] for h in history], ys)}, xlabel=label, ylabel=metric.replace("_", " "),
                        title=title)
        tracker.log_figure(fig, f"{prefix}/{stem}_vs_{name}.png")


# -- the loop ---------------------------------------------------------------------------------------
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
