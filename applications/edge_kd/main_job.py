"""``deepzero kd run``: the whole edge-KD story in one parent MLflow run.

Design the student for the device from the teacher's architecture → the teacher (given, or
trained FO by ``deepzero classify train``, run as a child process) → KD of that student with and
without each halting policy, by backprop and by ZO, one child run per variant (``run_sweep``) →
the ONNX deployment check of the backprop student → one table: accuracy, training FLOPs, teacher
queries and wall time (each halting run against the no-halting run of the same method and seed),
measured peak memory per training step; plots of accuracy against FLOPs and wall time, and of memory.
"""
from __future__ import annotations

import copy
from typing import Any

from applications.edge_kd.config import KDAppConfig, sweep_methods
from core.runtime.errors import UserError, user_errors
from core.runtime.plotting import tsv


def savings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with what it saved against the no-halting row of its method (same seed)."""
    base = {r["method"]: r for r in rows if r["policy"] == "none"}
    out = []
    for r in rows:
        b = base.get(r["method"])
        row = dict(r)
        if b is not None and r["policy"] != "none":
            row.update({"acc_delta_points": 100 * (r["test_accuracy"] - b["test_accuracy"]),
                        "flops_saved": 1 - r["train_flops"] / b["train_flops"],
                        "queries_saved": 1 - r["teacher_queries"] / max(1.0, b["teacher_queries"]),
                        "wall_saved": 1 - r["wall_time_s"] / b["wall_time_s"]})
        out.append(row)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'method':<8} {'halting':<8} {'test acc':>8} {'Δ pts':>6} {'train GFLOPs':>12} {'saved':>6} "
            f"{'teacher q':>9} {'saved':>6} {'wall s':>7} {'saved':>6} {'epochs':>6} {'step MiB':>8}")
    lines = [head]
    for r in rows:
        def pct(key: str) -> str:
            return f"{100 * r[key]:5.1f}%" if key in r else f"{'-':>6}"
        delta = f"{r['acc_delta_points']:+6.2f}" if "acc_delta_points" in r else f"{'-':>6}"
        lines.append(f"{r['method']:<8} {r['policy']:<8} {100 * r['test_accuracy']:7.2f}% {delta} "
                     f"{r['train_flops'] / 1e9:12.3f} {pct('flops_saved')} {r['teacher_queries']:9.0f} "
                     f"{pct('queries_saved')} {r['wall_time_s']:7.1f} {pct('wall_saved')} {r['epochs']:6d} "
                     f"{r['peak_step_memory_bytes'] / 2**20:8.2f}")
    return "\n".join(lines) + "\n"


def run_pipeline(cfg: KDAppConfig, *, progress: bool) -> int:
    from applications.edge_kd.design import format_table as constraints_table
    from applications.edge_kd.pipeline import deployment_result, print_export
    from applications.edge_kd.plots import curves, memory_bars
    from applications.edge_kd.profiles import load_profile
    from applications.edge_kd.teacher import train_teacher
    from applications.edge_kd.train import KDExperiment, design_for, evaluation_logits, load_data, teacher_for
    from core.runtime.config import flatten
    from core.runtime.loop import run_experiment, run_sweep
    from core.runtime.tracking import project_root

    methods, policies, extra = sweep_methods(cfg.sweep)
    profile = load_profile(cfg.device.profile)
    with user_errors():
        data, val = load_data(cfg)
    cfg = copy.deepcopy(cfg)
    if not cfg.teacher.source:                       # design before spending minutes on the teacher
        t = cfg.teacher
        planned = {"arch": t.arch, "kwargs": {"depth": t.depth, "width": t.width}} if t.arch == "cnn" else None
        design_for(cfg, data, planned, val)
        print(f"teacher: training {t.arch} (depth {t.depth}, width {t.width}) by backprop with deepzero classify "
              f"train, {t.epochs} epochs", flush=True)
        cfg.teacher.source = str(train_teacher(cfg, n_train=len(data.train), progress=progress))
    teacher = teacher_for(cfg, data)
    spec, design, student = design_for(cfg, data, teacher.spec, val)
    # the teacher's validation and test answers, asked once for every cell and before any MLflow run
    # opens: a teacher that cannot answer ends the job in one line with nothing half-made
    eval_logits = evaluation_logits(teacher.box(name="teacher-eval", max_batch=cfg.teacher.max_batch or None),
                                    val, data)
    kw = spec["kwargs"]
    print(f"student for {profile.name}: cnn depth {kw['depth']} width {kw['width']} ({student.params} parameters, "
          f"{student.flops / 1e6:.3g} MFLOPs per image); teacher {teacher.description}", flush=True)
    cells = []
    for method in methods + [m for m in extra if m not in methods]:
        for policy in ["none"] + (policies if method in methods else []):
            cell = copy.deepcopy(cfg)
            cell.optim.method, cell.halting.policy = method, policy
            cell.optim.lr = cfg.sweep.lr.get(method, cfg.optim.lr)
            cell.optim.epochs = cfg.sweep.epochs.get(method, cfg.optim.epochs)
            cell.validate()
            cells.append((f"{method}-{policy}", cell))
    export_cell = "fo-none" if any(n == "fo-none" for n, _ in cells) else cells[0][0]
    histories: dict[str, list] = {}
    exported: dict[str, Any] = {}

    def run_cell(name: str, cell: KDAppConfig, tracker) -> dict[str, Any]:
        exp = KDExperiment(cell, data=(data, val), teacher=teacher, spec=spec, eval_logits=eval_logits)
        exp.student, exp.plot_metric = student, None          # the parent plots every cell's curve together
        out = run_experiment(exp, tracker, progress=progress, save_checkpoints=False)
        if not out.history:
            raise UserError(f"kd run cell {name} stopped before its first epoch: {out.stopped}")
        histories[name] = out.history
        exported["teacher_test_accuracy"] = exp.teacher_test_accuracy
        if name == export_cell:
            exported["model"] = copy.deepcopy(exp.model).cpu()      # exported and timed on the CPU
        last = out.history[-1]
        row = {"method": cell.optim.method, "policy": cell.halting.policy, "test_accuracy": last["test_accuracy"],
               "val_accuracy": last["val_accuracy"], "train_flops": last["train_flops"],
               "teacher_queries": last["teacher_queries"], "wall_time_s": last["wall_time_s"],
               "epochs": len(out.history), "peak_step_memory_bytes": float(exp.peak_memory),
               "frozen_units": last["frozen_units"], "active_samples": last["active_samples"],
               "halt_reason": exp.halt_reason, "stopped": out.stopped or ""}
        print(f"{name:>16}: test accuracy {row['test_accuracy']:.4f}  train FLOPs {row['train_flops']:.3g}  teacher "
              f"queries {row['teacher_queries']:.0f}  wall {row['wall_time_s']:.1f}s  epochs {row['epochs']}  "
              f"step memory {row['peak_step_memory_bytes'] / 2**20:.2f} MiB", flush=True)
        return row

    def summarize(parent, rows: list[dict[str, Any]]) -> None:
        table = savings(rows)
        summarize.table = format_table(table)
        parent.log_text(summarize.table, "kd/table.txt")
        parent.log_text(tsv(table), "kd/table.tsv")
        parent.log_text(constraints_table(design.rows() if design else []), "design/constraints.txt")
        for key, label in (("train_flops", "training FLOPs (student, on the device)"),
                           ("wall_time_s", "wall time (s)")):
            fig = curves(histories, key, xlabel=label, title=f"KD on {cfg.data.name}, student for {profile.name}",
                         logx=key == "train_flops")
            parent.log_figure(fig, f"plots/accuracy_vs_{'flops' if key == 'train_flops' else 'wall_time'}.png")
        memory = {r["method"]: r["peak_step_memory_bytes"] for r in rows if r["policy"] == "none"}
        parent.log_figure(memory_bars(memory, title="measured peak memory of one training step"),
                          "plots/memory_per_step.png")
        metrics = {"teacher_test_accuracy": exported["teacher_test_accuracy"]}
        for r in table:
            key = f"{r['method']}_{r['policy']}"
            metrics[f"test_accuracy_{key}"] = r["test_accuracy"]
            for k in ("flops_saved", "queries_saved", "wall_saved"):
                if k in r:
                    metrics[f"{k}_{key}"] = r[k]
        if "fo" in memory:
            metrics.update({f"memory_ratio_{m}_vs_fo": v / memory["fo"] for m, v in memory.items() if m != "fo"})
        if "model" in exported:
            path = project_root() / "runs" / "kd" / parent.run_id / "student.onnx"
            result = deployment_result(exported["model"], data, path, profile,
                                       check_samples=cfg.export.check_samples, repeats=cfg.export.latency_repeats)
            parent.log_artifact(path, "export")
            parent.log_text(constraints_table(result["rows"]), "export/constraints.txt")
            parent.log_text(tsv(result["rows"]), "export/constraints.tsv")
            metrics.update({k: v for k, v in result.items() if isinstance(v, float)})
            summarize.export = result
        parent.log_metrics(metrics)

    params = {**flatten(cfg), "student.designed": f"cnn-d{kw['depth']}-w{kw['width']}"}
    parent_id, rows = run_sweep("kd", cells, run_cell, name="kd-run", params=params, experiment=cfg.run.experiment,
                                summarize=summarize)
    print(summarize.table, end="")
    if hasattr(summarize, "export"):
        print_export(summarize.export, profile.name)
    print(f"kd run {parent_id} (children: {len(rows)})")
    return 0

