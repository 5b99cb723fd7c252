"""Edge-KD speed and memory: what each halting policy saves, FO vs ZO step memory, PyTorch vs onnxruntime.

1. Halting: KD of the student designed for the Raspberry Pi 4 profile from a depth-3 width-48 CNN
   teacher on real MNIST, by backprop (and by sparse ZO-CGE with ``--zo``), without halting and with
   each policy; training FLOPs (FlopCounterMode on the real steps), teacher queries and wall time
   saved against the no-halting run of the same seed, and the accuracy change. Every cell is a
   ``deepzero kd`` training run logged to MLflow (experiment ``deepzero/kd``, run names ``bench-*``).
2. Memory: the measured peak memory of one training step (PyTorch profiler, everything the step
   allocates) for backprop, MeZO and sparse CGE, at several batch sizes; the ratios in one process.
3. Latency: the student on one image with PyTorch and with onnxruntime (single thread, medians).

    python -m benchmarks.kd_speed [--quick] [--zo] [--teacher CKPT]
"""
from __future__ import annotations

import argparse
import copy

from benchmarks.common import setup, write_json


def halting(args, cfg, data, teacher, spec) -> list[dict]:
    from applications.edge_kd.halting import POLICIES
    from applications.edge_kd.main_job import format_table, savings
    from applications.edge_kd.train import KDExperiment
    from core.runtime.loop import run_experiment
    from core.runtime.tracking import Tracker

    rows = []
    for method in ["fo"] + (["zo-cge"] if args.zo else []):
        for policy in POLICIES:
            cell = copy.deepcopy(cfg)
            cell.optim.method, cell.halting.policy = method, policy
            cell.optim.lr = cfg.sweep.lr.get(method, cfg.optim.lr)
            cell.optim.epochs = cfg.sweep.epochs.get(method, cfg.optim.epochs)
            with Tracker("kd", run_name=f"bench-{method}-{policy}") as tr:
                exp = KDExperiment(cell, data=data, teacher=teacher, spec=spec)
                exp.plot_metric = None
                out = run_experiment(exp, tr, progress=False, save_checkpoints=False)
            last = out.history[-1]
            rows.append({"method": method, "policy": policy, "test_accuracy": last["test_accuracy"],
                         "train_flops": last["train_flops"], "teacher_queries": last["teacher_queries"],
                         "wall_time_s": last["wall_time_s"], "epochs": len(out.history),
                         "peak_step_memory_bytes": float(exp.peak_memory), "run_id": tr.run_id})
            print(f"{method}-{policy}: {last['test_accuracy']:.4f}", flush=True)
    table = savings(rows)
    print(format_table(table), end="")
    return table


def memory(cfg, data, val, spec, batches: list[int]) -> list[dict]:
    from applications.edge_kd import learners
    from applications.edge_kd.train import kd_objective

    import torch

    rows = []
    for b in batches:
        x, target = val.x[:b], (val.y[:b], torch.zeros(b, data.num_classes), None)
        measured = {m: learners.step_memory(spec, m, kd_objective(cfg), x, target, zo=cfg.zo, optim=cfg.optim)
                    for m in ("fo", "zo-mezo", "zo-cge")}
        rows.append({"batch": b, **{f"{m}_bytes": v for m, v in measured.items()},
                     "mezo_over_fo": measured["zo-mezo"] / measured["fo"],
                     "cge_over_fo": measured["zo-cge"] / measured["fo"]})
    print(f"{'batch':>5} {'backprop MiB':>12} {'MeZO MiB':>9} {'CGE MiB':>8} {'MeZO/FO':>8} {'CGE/FO':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['fo_bytes'] / 2**20:12.2f} {r['zo-mezo_bytes'] / 2**20:9.2f} "
              f"{r['zo-cge_bytes'] / 2**20:8.2f} {r['mezo_over_fo']:8.3f} {r['cge_over_fo']:7.3f}")
    return rows


def latency(spec, data, repeats: int) -> dict:
    import tempfile
    from pathlib import Path

    from applications.edge_kd.export import export_onnx, latencies, session
    from core.models import from_spec

    model = from_spec(spec).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, data.input_shape, Path(tmp) / "student.onnx")
        out = latencies(model, session(path), data.input_shape, repeats=repeats)
    out["speedup"] = out["latency_torch_s"] / out["latency_onnxruntime_s"]
    print(f"one image: PyTorch {out['latency_torch_s'] * 1e3:.3f} ms, onnxruntime "
          f"{out['latency_onnxruntime_s'] * 1e3:.3f} ms ({out['speedup']:.1f}x)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1,500 training digits, 3 epochs, fewer timings")
    p.add_argument("--zo", action="store_true", help="also the sparse ZO-CGE cells (minutes each)")
    p.add_argument("--teacher", help="a classify checkpoint (default: train one with deepzero classify train)")
    args = p.parse_args()
    setup()
    from applications.edge_kd.config import PRESET_DIR, KDAppConfig
    from applications.edge_kd.teacher import train_teacher
    from applications.edge_kd.train import design_for, load_data, teacher_for
    from core.runtime.config import build_config

    overrides = ["data.train_subset=1500", "optim.epochs=3", "sweep.epochs.zo-cge=2"] if args.quick else []
    cfg = build_config(KDAppConfig, preset_dir=PRESET_DIR, preset="default", overrides=overrides)
    data, val = load_data(cfg)
    cfg.teacher.source = args.teacher or str(train_teacher(cfg, n_train=len(data.train), progress=True))
    teacher = teacher_for(cfg, data)
    spec, _, student = design_for(cfg, data, teacher.spec, val)
    kw = spec["kwargs"]
    print(f"student: cnn depth {kw['depth']} width {kw['width']}, {student.params} parameters")
    table = halting(args, cfg, (data, val), teacher, spec)
    mem = memory(cfg, data, val, spec, [32, 64] if args.quick else [16, 32, 64, 128])
    lat = latency(spec, data, 50 if args.quick else 500)
    path = write_json("kd_speed", {"quick": args.quick, "zo": args.zo, "student": spec, "halting": table,
                                   "memory": mem, "latency": lat})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
