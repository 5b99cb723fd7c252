"""``deepzero classify {train,prune,study}``: parse, resolve the config, call the library, log."""
from __future__ import annotations

import argparse
import sys

from core.runtime.cli import Parser, add_config_args, add_runtime_args, add_train_args, run_guarded
from core.runtime.config import available_presets
from core.runtime.launch import add_launch_args

VERBS = {
    "train": "train a model by ZO (sparse CGE by default), RGE, MeZO or backprop",
    "prune": "ZO-GraSP at initialisation: layer-wise pruning ratios as a table and a JSON file",
    "study": "CGE vs RGE vs FO across CNN depths (DeepZero Fig. 2), one parent run with a child per cell",
    "evaluate": "score a checkpoint's model on a data split and log the result as a run",
}


def _parser(prog: str) -> argparse.ArgumentParser:
    from applications.classification.config import PRESET_DIR

    presets = available_presets(PRESET_DIR)
    p = Parser(prog=prog, description="Classification from scratch by zeroth-order training.")
    sub = p.add_subparsers(dest="verb", metavar="{" + ",".join(VERBS) + "}", parser_class=Parser)
    sub.required = True
    t = sub.add_parser("train", help=VERBS["train"], description=VERBS["train"])
    add_config_args(t, presets)
    add_runtime_args(t)
    add_train_args(t)
    add_launch_args(t)
    t.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")
    t.add_argument("--ratios", metavar="FILE", help="layer-wise pruning ratios from 'classify prune'")
    r = sub.add_parser("prune", help=VERBS["prune"], description=VERBS["prune"])
    add_config_args(r, presets)
    add_runtime_args(r)
    r.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")
    r.add_argument("--out", metavar="FILE", help="where to write the ratios JSON (default under runs/classify/)")
    s = sub.add_parser("study", help=VERBS["study"], description=VERBS["study"])
    add_config_args(s, presets, default_preset="study")
    add_runtime_args(s)
    s.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")
    s.add_argument("--depths", default=None, help="comma-separated CNN depths (default 1,2,3,4,5)")
    s.add_argument("--methods", default=None, help="comma-separated subset of fo,cge,rge (default all)")
    s.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3)")
    s.add_argument("--quick", action="store_true",
                   help="reduced grid to check the pipeline: depths 1-2, one seed, 2 epochs, 512 images")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e = sub.add_parser("evaluate", help=VERBS["evaluate"], description=VERBS["evaluate"])
    e.add_argument("checkpoint", help="a checkpoint written by 'deepzero classify train'")
    e.add_argument("--split", default="test", help="test (default) or train")
    e.add_argument("--data-root", help="directory of cifar10 / imagefolder data (default: the run's)")
    e.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    add_runtime_args(e)
    return p


def _flag_overrides(args) -> list[str]:
    out = []
    if getattr(args, "data_root", None):
        out.append(f"data.data_root={args.data_root}")
    if getattr(args, "ratios", None):
        out.append(f"zo.ratios={args.ratios}")
    if getattr(args, "quick", False):
        out += ["optim.epochs=2", "data.train_subset=512"]
    return out


def _resolved(args):
    from applications.classification.config import PRESET_DIR, ClassifyConfig
    from core.runtime.cli import config_or_print

    return config_or_print(args, ClassifyConfig, PRESET_DIR, _flag_overrides(args))


def _train(args) -> int:
    from applications.classification.config import PRESET_DIR, RESUME_SAFE, ClassifyConfig
    from applications.classification.train import ClassifyExperiment
    from core.runtime.cli import train_command

    return train_command(args, schema=ClassifyConfig, preset_dir=PRESET_DIR, experiment=ClassifyExperiment,
                         prog="deepzero classify train", extra_overrides=_flag_overrides(args),
                         safe_keys=RESUME_SAFE, argv=args.argv[1:])


def _prune(args) -> int:
    from pathlib import Path

    from applications.classification.train import ClassifyExperiment
    from core.runtime.blocks import ratio_table
    from core.runtime.config import flatten
    from core.runtime.errors import UserError, user_errors
    from core.runtime.plotting import tsv
    from core.runtime.tracking import Tracker, project_root
    from core.sparsity import save_ratios

    cfg = _resolved(args)
    if cfg is None:
        return 0
    if cfg.zo.sparsity == 0.0:
        raise UserError("zo.sparsity is 0: nothing to prune (e.g. --set zo.sparsity=0.9)")
    if cfg.optim.method == "fo":
        cfg.optim.method = "zo-cge"
    name = (f"ratios-{cfg.model.arch}{cfg.model.depth if cfg.model.arch == 'cnn' else ''}"
            f"-{cfg.data.name}-s{cfg.zo.sparsity:g}-seed{cfg.run.seed}.json")
    out = Path(args.out) if args.out else project_root() / "runs" / "classify" / name
    if out.is_dir():                             # a folder: the default file name inside it
        out = out / name
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"--out {args.out}: {out.parent} is not a directory")
    with user_errors():
        exp = ClassifyExperiment(cfg)            # data, model and ratios before any run is opened
        meta = {"method": cfg.zo.ratios, "sparsity": cfg.zo.sparsity, "arch": cfg.model.arch,
                "depth": cfg.model.depth, "seed": cfg.run.seed}
        path = save_ratios(out, exp.ratios, meta)
    table = tsv(ratio_table(exp.model, exp.ratios))
    with Tracker("classify", experiment=cfg.run.experiment, run_name=f"prune-{cfg.zo.ratios}-{cfg.model.arch}") as tr:
        tr.log_params(flatten(cfg))
        tr.log_artifact(path, "sparsity")
        tr.log_text(table, "sparsity/ratios.tsv")
    print(table, end="")
    print(f"saved {path}  (use: deepzero classify train --ratios {path})")
    return 0


def _evaluate(args) -> int:
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.cli import resolve_device, setup_torch
    from core.runtime.errors import UserError, user_errors
    from core.runtime.tracking import Tracker

    setup_torch(args.threads)
    if args.split not in ("test", "train"):
        raise UserError(f"--split must be test or train; got '{args.split}'")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.device:
        resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, app="classify")
    if not state.get("model_spec"):
        raise UserError(f"checkpoint {args.checkpoint} does not describe its model (written by an older version)")
    device = resolve_device(args.device or state["config"]["run"]["device"])
    from applications.classification.train import evaluate
    from core.models import from_spec
    from core.runtime.data import load_dataset

    data_cfg = state["config"]["data"]
    with user_errors():
        model = from_spec(state["model_spec"], state["model"]).to(device)   # takes [0, 1] pixels
        data = load_dataset(data_cfg["name"], args.data_root or data_cfg["data_root"],
                            image_size=data_cfg["image_size"], normalize=False)
    split = getattr(data, args.split)
    split.x, split.y = split.x.to(device), split.y.to(device)
    acc, loss = evaluate(model, split, args.batch_size, device)
    source = state.get("mlflow_run_id")
    cfg = state["config"]
    with Tracker("classify", experiment=cfg["run"].get("experiment"),
                 run_name=f"evaluate-{(source or 'run')[:8]}-{args.split}") as tr:
        tr.log_params({"checkpoint": str(args.checkpoint), "split": args.split, "data.name": data_cfg["name"],
                       "model.arch": state["model_spec"]["arch"]})
        tr.set_tags({"deepzero.source_run": source or "", "deepzero.verb": "evaluate"})
        tr.log_metrics({f"{args.split}_accuracy": acc, f"{args.split}_loss": loss, "samples": len(split)})
    print(f"{args.split} accuracy {acc:.4f}  loss {loss:.4f}  ({len(split)} samples, epoch {state['epoch']} of run "
          f"{source}); logged as run {tr.run_id}")
    return 0


def _study(args) -> int:
    from applications.classification.study import run_study

    cfg = _resolved(args)
    if cfg is None:
        return 0
    return run_study(cfg, depths=args.depths, methods=args.methods, seeds=args.seeds, quick=args.quick,
                     progress=not args.no_progress)


def main(argv: list[str] | None = None, prog: str = "deepzero classify") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(prog).parse_args(argv)
    args.argv = argv                           # the verb and its arguments, for --nproc's relaunch
    handler = {"train": _train, "prune": _prune, "study": _study, "evaluate": _evaluate}[args.verb]
    return run_guarded(lambda: handler(args), f"{prog} {args.verb}")
