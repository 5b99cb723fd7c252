"""Command-line helpers shared by the applications: one-line errors, common flags, thread setup."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from core.runtime.errors import UserError


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``prog: error: ...``) with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Unknown arguments are reported by the verb's parser, so the hint names the verb's help."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            verb = None
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    verb = action.choices.get(getattr(ns, action.dest, None) or "")
            (verb or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def add_config_args(p: argparse.ArgumentParser, presets: list[str], default_preset: str = "default") -> None:
    p.add_argument("--preset", default=None,
                   help=f"named preset ({', '.join(presets)}); default: {default_preset}")
    p.set_defaults(default_preset=default_preset)
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys, applied after the preset")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config key, e.g. --set optim.lr=0.01 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: more threads slow small models down on few cores)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the config's device)")


def setup_torch(threads: int) -> None:
    """One torch thread unless asked otherwise, and the allocator tuned for big temporaries."""
    import torch

    from core.runtime.perf import tune_allocator

    if threads < 1:
        raise UserError(f"--threads must be >= 1; got {threads}")
    torch.set_num_threads(threads)
    tune_allocator()


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available on this machine; use --device cpu")
    return dev


def run_guarded(fn: Callable[[], int | None], prog: str) -> int:
    """Run ``fn``; a :class:`UserError` becomes one line on stderr and exit status 2."""
    try:
        return int(fn() or 0)
    except UserError as exc:
        from core.runtime.ranks import rank_label

        print(f"{rank_label()}{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        from core.runtime.ranks import rank_label

        print(f"{rank_label()}{prog}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:                 # a rank of a multi-process run lost the others
        from core.collectives import RankLost

        if not isinstance(exc, RankLost):
            raise
        from core.runtime.ranks import rank_label

        print(f"{rank_label()}{prog}: stopped: {exc}", file=sys.stderr)
        return 1


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Flags of every app's training verb beyond the config ones: resume and progress."""
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue a run from its checkpoint (same MLflow run; --set may only change safe keys "
                        "such as optim.epochs)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def resolve_config(args: argparse.Namespace, schema: type, preset_dir, extra_overrides: list[str] = ()):
    """The config from ``--preset``/``--config``/``--set`` plus flag-derived overrides."""
    from core.runtime.config import build_config

    overrides = list(args.overrides) + list(extra_overrides)
    if getattr(args, "device", None):
        overrides.append(f"run.device={args.device}")
    cfg = build_config(schema, preset_dir=preset_dir, preset=(args.preset or args.default_preset) if preset_dir
                       else args.preset, config_file=args.config, overrides=overrides)
    if hasattr(getattr(cfg, "run", None), "device"):
        resolve_device(cfg.run.device)          # an unusable device fails here, before anything runs
    return cfg


def config_or_print(args: argparse.Namespace, schema: type, preset_dir, extra_overrides: list[str] = ()):
    """Threads set and the config resolved; None when only ``--print-config`` was asked (and done)."""
    from core.runtime.config import to_yaml

    setup_torch(args.threads)
    cfg = resolve_config(args, schema, preset_dir, list(extra_overrides))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg


def train_command(args: argparse.Namespace, *, schema: type, preset_dir, experiment: type, prog: str,
                  extra_overrides: list[str] = (), safe_keys: tuple[str, ...] = (),
                  on_epoch: Callable[[dict], None] | None = None, argv: list[str] | None = None) -> int:
    """The training verb of any app: config (or checkpoint + safe changes) → experiment → loop.

    Every mistake in the config, data, model or checkpoint surfaces before an MLflow run is opened.
    With ``--nproc N`` (:func:`core.runtime.launch.add_launch_args`; ``argv``: the verb's own
    arguments) the command relaunches itself on N ranks; as one of several ranks it shards CGE
    and only rank 0 logs, prints and checkpoints.
    """
    from core.runtime import launch
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.config import to_yaml
    from core.runtime.errors import user_errors
    from core.runtime.loop import checkpoint_path, resume_config, run_experiment

    setup_torch(args.threads)
    launch.check_launch_args(args)
    state = None
    if args.resume:
        state = load_checkpoint(args.resume, app=experiment.app)
        if args.preset is not None:
            raise UserError("--resume takes the checkpoint's config: drop --preset (use --set for safe changes)")
        overrides = list(args.overrides) + list(extra_overrides)
        if getattr(args, "device", None):
            overrides.append(f"run.device={args.device}")
        cfg = resume_config(schema, state["config"], config_file=args.config, overrides=overrides,
                            safe_keys=safe_keys)
    else:
        cfg = resolve_config(args, schema, preset_dir, list(extra_overrides))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    lead = "RANK" not in os.environ or os.environ["RANK"] == "0"
    if state is not None and lead:
        _check_run_exists(state.get("mlflow_run_id"))
    if launch.wants_launch(args):
        launch.refuse_unsharded(cfg, args.nproc)
        launch.refuse_one_gpu(cfg, args.nproc)
        from types import SimpleNamespace

        app = SimpleNamespace(cfg=cfg, app=experiment.app)
        return launch.launch_local(args, list(argv or []), prog=prog,
                                   checkpoint_of=lambda run_id: checkpoint_path(app, run_id))
    from core.runtime.ranks import start_session

    session = start_session(args, resolve_device(cfg.run.device)) if hasattr(cfg.run, "device") else None
    with user_errors():
        exp = experiment(cfg, resume=state)
    if state is not None:
        exp.load_state_dict(state)
        if exp.total_epochs < exp.epoch:
            raise UserError(f"the checkpoint has finished {exp.epoch} epochs; optim.epochs={cfg.optim.epochs} would "
                            "undo them (a resume may only add epochs)")
    if session is not None:
        session.attach(exp)
    from core.runtime.tracking import NullTracker, Tracker

    tracker = Tracker(experiment.app, experiment=cfg.run.experiment, run_name=cfg.run.run_name or exp.run_name(),
                      run_id=state["mlflow_run_id"] if state else None) if lead else NullTracker()
    with tracker as tr:
        if lead:
            print(f"run {tr.run_id}: {exp.summary()}{' (resumed)' if state else ''}", flush=True)
        if lead and (session is not None or state is not None):
            tr.set_tags({"deepzero.ranks": session.world if session else 1})
        resume = f"{prog} --resume {{checkpoint}}" + (f" --nproc {session.world}" if session and hasattr(args, "nproc")
                                                      else "")
        out = run_experiment(exp, tr, progress=lead and not args.no_progress, save_checkpoints=lead,
                             on_epoch=(on_epoch or print_epoch) if lead else None, resume_command=resume,
                             sync=session.sync if session else None)
    if out.stopped is not None:
        if lead:
            print(f"{prog}: stopped: {out.stopped}; {out.extra['resume_hint']}", file=sys.stderr)
        else:                           # e.g. rank 0 hung: this rank's line is the one that names it
            from core.runtime.ranks import rank_label

            print(f"{rank_label()}{prog}: stopped: {out.stopped}", file=sys.stderr)
            if out.extra.get("every_rank"):
                return 0                # rank 0 stops alike and reports it: torchrun must not end it first
        return 1
    if not lead:
        return 0
    print(f"checkpoint: {out.checkpoint}")
    print(f"browse: deepzero ui   (run {out.run_id})")
    return 0


def _check_run_exists(run_id: str | None) -> None:
    from mlflow.exceptions import MlflowException

    from core.runtime.tracking import client

    c = client()
    try:
        c.get_run(run_id or "")
    except MlflowException:
        raise UserError(f"the checkpoint's MLflow run {run_id} is not in the tracking store {c.tracking_uri}: "
                        "resume with the DEEPZERO_HOME / MLFLOW_TRACKING_URI the run was started with") from None


def print_epoch(row: dict) -> None:
    """One line per epoch: the epoch, then every metric of the history row."""
    parts = [f"epoch {int(row['epoch']):3d}"]
    for k, v in row.items():
        if k == "epoch":
            continue
        parts.append(f"{k} {v:.3e}" if k == "queries" else f"{k} {v:.4f}" if abs(v) < 1e4 else f"{k} {v:.4g}")
    print("  ".join(parts), flush=True)
