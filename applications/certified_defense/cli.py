"""``deepzero defense {target,train,certify,verify,run}``: parse, resolve the config, call the library, log."""
from __future__ import annotations

import argparse
import sys

from core.runtime.cli import Parser, add_config_args, add_runtime_args, add_train_args, run_guarded
from core.runtime.config import available_presets

VERBS = {
    "target": "train the classifier to defend (FO, clean [0, 1] pixels, normalisation as its first layer)",
    "train": "train a denoiser in front of the query-only classifier: fo-ds | zo-ae-ds | zo-ds",
    "certify": "certify the smoothed (denoiser +) classifier by randomized smoothing (CERTIFY, Cohen et al.)",
    "verify": "white-box comparator: auto-LiRPA verified accuracy next to PGD and clean accuracy",
    "run": "the main job: target, the three trainers, certification, one comparison table and plot",
}


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", metavar="SPEC", help="the classifier: a checkpoint, pkg.mod:fn, 'exec:COMMAND' or "
                                                     "http://127.0.0.1:PORT (sets target.source)")
    p.add_argument("--labels-only", action="store_true", help="the classifier answers labels, not logits")
    p.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")


def _parser(prog: str) -> argparse.ArgumentParser:
    from applications.certified_defense.config import PRESET_DIR

    presets = available_presets(PRESET_DIR)
    p = Parser(prog=prog, description="Certified defense of a query-only classifier by denoised smoothing.")
    sub = p.add_subparsers(dest="verb", metavar="{" + ",".join(VERBS) + "}", parser_class=Parser)
    sub.required = True
    t = sub.add_parser("target", help=VERBS["target"], description=VERBS["target"])
    add_config_args(t, presets)
    add_runtime_args(t)
    t.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")
    t.add_argument("--out", metavar="FILE", help="checkpoint to write (default runs/defense/targets/...)")
    tr = sub.add_parser("train", help=VERBS["train"], description=VERBS["train"])
    add_config_args(tr, presets)
    add_runtime_args(tr)
    add_train_args(tr)
    _target_args(tr)
    tr.add_argument("--method", help="fo-ds | zo-ae-ds | zo-ds (sets optim.method)")
    tr.add_argument("--budget", type=int, help="stop at this many training queries to the classifier")
    c = sub.add_parser("certify", help=VERBS["certify"], description=VERBS["certify"])
    c.add_argument("denoiser", help="a checkpoint of 'defense train', or 'none' to smooth the bare classifier")
    add_config_args(c, presets)
    add_runtime_args(c)
    _target_args(c)
    c.add_argument("--out", metavar="FILE", help="certification TSV (default runs/defense/certify/...); an existing "
                                                 "one is resumed")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    v = sub.add_parser("verify", help=VERBS["verify"], description=VERBS["verify"])
    add_config_args(v, presets)
    add_runtime_args(v)
    _target_args(v)
    v.add_argument("--denoiser", help="a checkpoint of 'defense train' to verify together with the classifier")
    v.add_argument("--eps", default="0.01,0.03", help="comma-separated radii (default 0.01,0.03)")
    v.add_argument("--norms", default="inf,2", help="comma-separated subset of inf,2 (default both)")
    v.add_argument("--methods", default="IBP,CROWN", help="comma-separated subset of IBP,CROWN,alpha-CROWN")
    v.add_argument("--samples", type=int, default=8,
                   help="test images to verify (default 8; CROWN on a CPU takes seconds per image)")
    r = sub.add_parser("run", help=VERBS["run"], description=VERBS["run"])
    add_config_args(r, presets)
    add_runtime_args(r)
    r.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")
    r.add_argument("--methods", default="fo-ds,zo-ae-ds,zo-ds", help="trainers to compare (default all three)")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _flag_overrides(args) -> list[str]:
    out = []
    if getattr(args, "data_root", None):
        out.append(f"data.data_root={args.data_root}")
    if getattr(args, "target", None):
        out.append(f"target.source={args.target}")
    if getattr(args, "labels_only", False):
        out.append("target.labels_only=true")
    if getattr(args, "method", None):
        out.append(f"optim.method={args.method}")
    if getattr(args, "budget", None) is not None:
        out.append(f"target.budget={args.budget}")
    return out


def _resolved(args):
    from applications.certified_defense.config import PRESET_DIR, DefenseConfig
    from core.runtime.cli import config_or_print

    return config_or_print(args, DefenseConfig, PRESET_DIR, _flag_overrides(args))


def _target(args) -> int:
    from applications.certified_defense.pipeline import train_and_save_target

    cfg = _resolved(args)
    if cfg is None:
        return 0
    path, acc, run_id = train_and_save_target(cfg, out=args.out)
    print(f"target: clean test accuracy {acc:.4f}; saved {path}  (run {run_id})")
    print(f"use: deepzero defense train --target {path}")
    return 0


def _train(args) -> int:
    from applications.certified_defense.config import PRESET_DIR, RESUME_SAFE, DefenseConfig
    from applications.certified_defense.train import DefenseExperiment
    from core.runtime.cli import train_command

    return train_command(args, schema=DefenseConfig, preset_dir=PRESET_DIR, experiment=DefenseExperiment,
                         prog="deepzero defense train", extra_overrides=_flag_overrides(args),
                         safe_keys=RESUME_SAFE)


def _certify(args) -> int:
    from applications.certified_defense.pipeline import certify_command

    cfg = _resolved(args)
    if cfg is None:
        return 0
    return certify_command(cfg, args.denoiser, out=args.out, progress=not args.no_progress)


def _verify(args) -> int:
    from applications.certified_defense.pipeline import verify_command

    cfg = _resolved(args)
    if cfg is None:
        return 0
    return verify_command(cfg, denoiser=args.denoiser, eps=args.eps, norms=args.norms, methods=args.methods,
                          samples=args.samples)


def _run(args) -> int:
    from applications.certified_defense.pipeline import run_pipeline

    cfg = _resolved(args)
    if cfg is None:
        return 0
    return run_pipeline(cfg, methods=args.methods, progress=not args.no_progress)


def main(argv: list[str] | None = None, prog: str = "deepzero defense") -> int:
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    handler = {"target": _target, "train": _train, "certify": _certify, "verify": _verify, "run": _run}[args.verb]
    return run_guarded(lambda: handler(args), f"{prog} {args.verb}")
