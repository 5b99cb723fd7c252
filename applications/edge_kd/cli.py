"""``deepzero kd {calibrate,design,train,export,run}``: parse, resolve the config, call the library, log."""
from __future__ import annotations

import argparse
import sys

from core.runtime.cli import Parser, add_config_args, add_train_args, run_guarded
from core.runtime.config import available_presets

VERBS = {
    "calibrate": "measure this machine's effective FLOP/s and write a device profile YAML",
    "design": "design the student for a device from the teacher and print the constraint table",
    "train": "distill the teacher into the student (Hinton KD) by backprop or ZO, with optional early halting",
    "export": "deployment check: the student as ONNX, checked against PyTorch, latency measured and scaled",
    "run": "the main job: teacher, design, KD with and without each halting policy (FO and ZO), export, table",
}


def _common(p: argparse.ArgumentParser, presets: list[str], *, teacher: bool = True) -> None:
    add_config_args(p, presets)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", dest="profile", metavar="PROFILE",
                   help="device profile: rpi4, jetson-nano, mcu or a profile YAML (sets device.profile)")
    if teacher:
        p.add_argument("--teacher", metavar="SPEC", help="a classify checkpoint or pkg.module:callable "
                                                         "(sets teacher.source)")
    p.add_argument("--data-root", help="directory of cifar10 / imagefolder data (sets data.data_root)")


def _parser(prog: str) -> argparse.ArgumentParser:
    from applications.edge_kd.config import PRESET_DIR

    presets = available_presets(PRESET_DIR)
    p = Parser(prog=prog, description="Edge knowledge distillation: a student designed for a device, distilled "
                                      "from a teacher that is only queried, trained by backprop or forward-only ZO.")
    sub = p.add_subparsers(dest="verb", metavar="{" + ",".join(VERBS) + "}", parser_class=Parser)
    sub.required = True
    c = sub.add_parser("calibrate", help=VERBS["calibrate"], description=VERBS["calibrate"])
    c.add_argument("--out", metavar="FILE", help="profile to write (default runs/kd/devices/this-machine.yaml)")
    c.add_argument("--name", default="this machine", help="the profile's name")
    c.add_argument("--storage", type=int, default=64 << 20, help="storage budget in bytes (default 64 MiB)")
    c.add_argument("--ram", type=int, default=None, help="RAM budget in bytes (default: this machine's memory)")
    c.add_argument("--max-latency-ms", type=float, default=1.0, help="deadline per inference in ms (default 1)")
    c.add_argument("--bytes-per-param", type=int, default=4, help="4 fp32, 2 fp16, 1 int8 (default 4)")
    c.add_argument("--repeats", type=int, default=100, help="timed inferences (default 100)")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    d = sub.add_parser("design", help=VERBS["design"], description=VERBS["design"])
    _common(d, presets)
    d.add_argument("--out", metavar="FILE", help="design JSON to write (default under runs/kd/designs/)")
    t = sub.add_parser("train", help=VERBS["train"], description=VERBS["train"])
    _common(t, presets)
    add_train_args(t)
    t.add_argument("--method", help="fo | zo-cge | zo-rge | zo-mezo (sets optim.method)")
    t.add_argument("--halting", help="none | plateau | drop | teacher | freeze (sets halting.policy)")
    e = sub.add_parser("export", help=VERBS["export"], description=VERBS["export"])
    e.add_argument("checkpoint", help="a checkpoint written by 'deepzero kd train'")
    e.add_argument("--device", dest="profile", metavar="PROFILE", help="device profile (default: the run's)")
    e.add_argument("--out", metavar="FILE", help="ONNX file to write (default runs/kd/<run id>/student.onnx)")
    e.add_argument("--repeats", type=int, default=200, help="timed single-image inferences (default 200)")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    r = sub.add_parser("run", help=VERBS["run"], description=VERBS["run"])
    _common(r, presets)
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _flag_overrides(args) -> list[str]:
    flags = {"profile": "device.profile", "teacher": "teacher.source", "data_root": "data.data_root",
             "method": "optim.method", "halting": "halting.policy"}
    return [f"{key}={getattr(args, name)}" for name, key in flags.items() if getattr(args, name, None)]


def _resolved(args):
    from applications.edge_kd.config import PRESET_DIR, KDAppConfig
    from core.runtime.cli import config_or_print

    return config_or_print(args, KDAppConfig, PRESET_DIR, _flag_overrides(args))


def _calibrate(args) -> int:
    from applications.edge_kd.pipeline import calibrate_command
    from core.runtime.cli import setup_torch

    setup_torch(args.threads)
    return calibrate_command(out=args.out, name=args.name, storage=args.storage, ram=args.ram,
                             max_latency_ms=args.max_latency_ms, bytes_per_param=args.bytes_per_param,
                             repeats=args.repeats)


def _design(args) -> int:
    from applications.edge_kd.pipeline import design_command

    cfg = _resolved(args)
    return 0 if cfg is None else design_command(cfg, out=args.out)


def _train(args) -> int:
    from applications.edge_kd.config import PRESET_DIR, RESUME_SAFE, KDAppConfig
    from applications.edge_kd.train import KDExperiment
    from core.runtime.cli import train_command

    return train_command(args, schema=KDAppConfig, preset_dir=PRESET_DIR, experiment=KDExperiment,
                         prog="deepzero kd train", extra_overrides=_flag_overrides(args), safe_keys=RESUME_SAFE)


def _export(args) -> int:
    from applications.edge_kd.pipeline import export_command
    from core.runtime.cli import setup_torch

    setup_torch(args.threads)
    return export_command(args.checkpoint, profile_spec=args.profile, out=args.out, repeats=args.repeats)


def _run(args) -> int:
    from applications.edge_kd.main_job import run_pipeline

    cfg = _resolved(args)
    return 0 if cfg is None else run_pipeline(cfg, progress=not args.no_progress)


def main(argv: list[str] | None = None, prog: str = "deepzero kd") -> int:
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    handler = {"calibrate": _calibrate, "design": _design, "train": _train, "export": _export, "run": _run}[args.verb]
    return run_guarded(lambda: handler(args), f"{prog} {args.verb}")
