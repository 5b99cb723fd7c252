"""``deepzero classify {train,prune,study}``: parse, resolve the config, call the library, log."""
from __future__ import annotations

import argparse
import sys

from core.runtime.cli import Parser, add_config_args, add_runtime_args, run_guarded
from core.runtime.config import available_presets

VERBS = {
    "train": "train a model by ZO (sparse CGE by default), RGE, MeZO or backprop",
    "prune": "ZO-GraSP at initialisation: layer-wise pruning ratios as a table and a JSON file",
    "study": "CGE vs RGE vs FO across CNN depths (DeepZero Fig. 2), one parent run with a child per cell",
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
    t.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")
    t.add_argument("--ratios", metavar="FILE", help="layer-wise pruning ratios from 'classify prune'")
    t.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its checkpoint (same MLflow run)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r = sub.add_parser("prune", help=VERBS["prune"], description=VERBS["prune"])
    add_config_args(r, presets)
    add_runtime_args(r)
    r.add_argument("--data-root")
    r.add_argument("--out", metavar="FILE", help="where to write the ratios JSON (default under runs/classify/)")
    s = sub.add_parser("study", help=VERBS["study"], description=VERBS["study"])
    add_config_args(s, presets, default_preset="study")
    add_runtime_args(s)
    s.add_argument("--data-root")
    s.add_argument("--depths", default=None, help="comma-separated CNN depths (default 1,2,3,4,5)")
    s.add_argument("--methods", default=None, help="comma-separated subset of fo,cge,rge (default all)")
    s.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3)")
    s.add_argument("--quick", action="store_true", help="reduced grid to check the pipeline: depths 1-2, one seed, 2 epochs, 512 images")
    s.add_argument("--no-progress", action="store_true")
    return p


def _config(args):
    from applications.classification.config import PRESET_DIR, ClassifyConfig
    from core.runtime.config import build_config

    overrides = list(args.overrides)
    if getattr(args, "data_root", None):
        overrides.append(f"data.data_root={args.data_root}")
    if getattr(args, "ratios", None):
        overrides.append(f"zo.ratios={args.ratios}")
    if args.device:
        overrides.append(f"run.device={args.device}")
    return build_config(ClassifyConfig, preset_dir=PRESET_DIR, preset=args.preset, config_file=args.config,
                        overrides=overrides)


def _resolved(args):
    """Threads set, config resolved; None when only ``--print-config`` was asked (and done)."""
    from core.runtime.cli import setup_torch
    from core.runtime.config import to_yaml

    setup_torch(args.threads)
    cfg = _config(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg


def _train(args) -> int:
    import dataclasses

    from applications.classification.config import ClassifyConfig
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.cli import setup_torch
    from core.runtime.config import build_config, to_yaml
    from core.runtime.errors import UserError
    from core.runtime.tracking import Tracker

    state = None
    if args.resume:
        setup_torch(args.threads)
        state = load_checkpoint(args.resume, app="classify")
        overrides = list(args.overrides) + ([f"run.device={args.device}"] if args.device else [])
        cfg = build_config(ClassifyConfig, base=state["config"], overrides=overrides)
        if dataclasses.asdict(cfg)["model"] != state["config"]["model"]:
            raise UserError("--resume cannot change model.* keys")
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
    else:
        cfg = _resolved(args)
        if cfg is None:
            return 0
    from applications.classification.train import Trainer, train

    trainer = Trainer(cfg)                   # data, device, model, ratios: fail before any run is opened
    if state is not None:
        trainer.load_state_dict(state)
    run_id = state["mlflow_run_id"] if state else None
    with Tracker("classify", run_name=cfg.run.run_name or f"{cfg.optim.method}-{cfg.model.arch}", run_id=run_id) as tr:
        print(f"run {tr.run_id}: {cfg.optim.method} on {cfg.data.name}, {cfg.model.arch}"
              f"{'-' + str(cfg.model.depth) if cfg.model.arch == 'cnn' else ''}, {cfg.optim.epochs} epochs"
              f"{' (resumed)' if state else ''}", flush=True)

        def show(row):
            print(f"epoch {int(row['epoch']):3d}  train_loss {row['train_loss']:.4f}  test_accuracy "
                  f"{row['test_accuracy']:.4f}  queries {row['queries']:.3e}  wall {row['wall_time_s']:.1f}s",
                  flush=True)

        out = train(cfg, tracker=tr, resume=state, progress=not args.no_progress, on_epoch=show, trainer=trainer)
    print(f"checkpoint: {out['checkpoint']}")
    print(f"browse: deepzero ui   (run {out['run_id']})")
    return 0


def _prune(args) -> int:
    from applications.classification.train import Trainer, ratio_table
    from core.runtime.config import flatten
    from core.runtime.errors import UserError
    from core.runtime.tracking import Tracker, project_root

    cfg = _resolved(args)
    if cfg is None:
        return 0
    if cfg.zo.sparsity == 0.0:
        raise UserError("zo.sparsity is 0: nothing to prune (e.g. --set zo.sparsity=0.9)")
    if cfg.optim.method == "fo":
        cfg.optim.method = "zo-cge"
    trainer = Trainer(cfg)
    with Tracker("classify", run_name=f"prune-{cfg.zo.ratios}-{cfg.model.arch}") as tr:
        tr.log_params(flatten(cfg))
        table = ratio_table(trainer.model, trainer.ratios)
        out = args.out or (project_root() / "runs" / "classify" /
                           f"ratios-{cfg.model.arch}{cfg.model.depth if cfg.model.arch == 'cnn' else ''}"
                           f"-{cfg.data.name}-s{cfg.zo.sparsity:g}-seed{cfg.run.seed}.json")
        from core.sparsity import save_ratios

        path = save_ratios(out, trainer.ratios, {"method": cfg.zo.ratios, "sparsity": cfg.zo.sparsity,
                                                 "arch": cfg.model.arch, "depth": cfg.model.depth,
                                                 "seed": cfg.run.seed})
        tr.log_artifact(path, "sparsity")
        tr.log_text(table, "sparsity/ratios.tsv")
    print(table, end="")
    print(f"saved {path}  (use: deepzero classify train --ratios {path})")
    return 0


def _study(args) -> int:
    from applications.classification.study import run_study

    cfg = _resolved(args)
    if cfg is None:
        return 0
    return run_study(cfg, depths=args.depths, methods=args.methods, seeds=args.seeds, quick=args.quick,
                     progress=not args.no_progress)


def main(argv: list[str] | None = None, prog: str = "deepzero classify") -> int:
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    handler = {"train": _train, "prune": _prune, "study": _study}[args.verb]
    return run_guarded(lambda: handler(args), f"{prog} {args.verb}")
