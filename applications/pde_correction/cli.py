"""``deepzero pde {generate,train,evaluate,run}``: parse, resolve the config, call the library."""
from __future__ import annotations

import argparse
import sys

from core.runtime.cli import Parser, add_config_args, add_runtime_args, add_train_args, run_guarded
from core.runtime.config import available_presets

VERBS = {
    "generate": "reference simulations (fine solver, spin-up discarded, block-averaged to the source grid)",
    "train": "train a corrector: --mode non | unrolled-net | zo-sol | fo-sol (src is the solver alone)",
    "evaluate": "long-rollout MAE of 'src' and corrector checkpoints on the held-out conditions",
    "run": "the main job: generate, train every mode, evaluate, one table, plots and a rollout GIF",
}
SOLVER_HELP = ("burgers | wake | package.module:Class | 'exec:COMMAND' | http://127.0.0.1:PORT; 'wake' also "
               "selects the wake preset (sets solver.source and solver.reference)")


def _solver_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", metavar="SPEC", help=SOLVER_HELP)


def _parser(prog: str) -> argparse.ArgumentParser:
    from applications.pde_correction.config import PRESET_DIR

    presets = available_presets(PRESET_DIR)
    p = Parser(prog=prog, description="Solver-in-the-loop PDE correction through a black-box solver.")
    sub = p.add_subparsers(dest="verb", metavar="{" + ",".join(VERBS) + "}", parser_class=Parser)
    sub.required = True
    g = sub.add_parser("generate", help=VERBS["generate"], description=VERBS["generate"])
    add_config_args(g, presets)
    add_runtime_args(g)
    _solver_arg(g)
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t = sub.add_parser("train", help=VERBS["train"], description=VERBS["train"])
    add_config_args(t, presets)
    add_runtime_args(t)
    add_train_args(t)
    _solver_arg(t)
    t.add_argument("--mode", help="non | unrolled-net | zo-sol | fo-sol (sets train.mode)")
    t.add_argument("--method", help="zo-sol's estimator: zo-cge | zo-rge | zo-mezo (sets optim.method)")
    e = sub.add_parser("evaluate", help=VERBS["evaluate"], description=VERBS["evaluate"])
    e.add_argument("models", nargs="+", metavar="MODEL", help="'src' (the solver alone) and/or checkpoints of "
                                                               "'deepzero pde train' (their solver and data "
                                                               "settings are used)")
    add_config_args(e, presets)
    add_runtime_args(e)
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r = sub.add_parser("run", help=VERBS["run"], description=VERBS["run"])
    add_config_args(r, presets)
    add_runtime_args(r)
    _solver_arg(r)
    r.add_argument("--modes", default=None,
                   help="modes to compare (default src,non,unrolled-net,zo-sol-cge,zo-sol-rge,fo-sol, without "
                        "fo-sol where the solver has no differentiable twin; also "
                        "zo-sol-mezo)")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _overrides(args) -> list[str]:
    out = []
    solver = getattr(args, "solver", None)
    if solver:
        if solver == "wake" and args.preset is None and not getattr(args, "resume", None):
            args.preset = "wake"
        if solver.startswith(("exec:", "http://", "https://")) and getattr(args, "verb", None) == "generate":
            out.append(f"solver.reference={solver}")    # generate: the external solver makes the reference data
        elif solver.startswith(("exec:", "http://", "https://")):
            out.append(f"solver.source={solver}")   # an external solver is the coarse black box; the reference
        else:                                        # data still come from the preset's (fine) reference solver
            out += [f"solver.source={solver}", f"solver.reference={solver}"]
        if solver not in ("burgers", "wake") and not solver.startswith(("exec:", "http://", "https://")):
            out.append("solver.family=" + ("wake" if args.preset == "wake" else "burgers"))
    if getattr(args, "mode", None):
        out.append(f"train.mode={args.mode}")
    if getattr(args, "method", None):
        out.append(f"optim.method={args.method}")
    return out


def _resolved(args):
    from applications.pde_correction.config import PRESET_DIR, PDEConfig
    from core.runtime.cli import config_or_print

    return config_or_print(args, PDEConfig, PRESET_DIR, _overrides(args))


def _generate(args) -> int:
    from applications.pde_correction.pipeline import generate_command

    cfg = _resolved(args)
    return 0 if cfg is None else generate_command(cfg, progress=not args.no_progress)


def _train(args) -> int:
    from applications.pde_correction.config import PRESET_DIR, RESUME_SAFE, PDEConfig
    from applications.pde_correction.train import PDEExperiment
    from core.runtime.cli import train_command

    return train_command(args, schema=PDEConfig, preset_dir=PRESET_DIR, experiment=PDEExperiment,
                         prog="deepzero pde train", extra_overrides=_overrides(args), safe_keys=RESUME_SAFE)


def _evaluate(args) -> int:
    from applications.pde_correction.pipeline import evaluate_command

    cfg = _resolved(args)
    # without --preset/--config a checkpoint's own evaluate settings apply, with --set evaluate.* on top
    own = args.preset is None and not getattr(args, "config", None)
    tweaks = [o for o in (getattr(args, "overrides", None) or []) if o.startswith("evaluate.")]
    return 0 if cfg is None else evaluate_command(cfg, args.models, progress=not args.no_progress,
                                                  evaluate_from_checkpoint=tweaks if own else None)


def _run(args) -> int:
    from applications.pde_correction.pipeline import run_pipeline

    cfg = _resolved(args)
    return 0 if cfg is None else run_pipeline(cfg, cells=args.modes, progress=not args.no_progress)


def main(argv: list[str] | None = None, prog: str = "deepzero pde") -> int:
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    handler = {"generate": _generate, "train": _train, "evaluate": _evaluate, "run": _run}[args.verb]
    return run_guarded(lambda: handler(args), f"{prog} {args.verb}")
