"""The kd verbs beyond training and the main job: calibrate, design, export (``kd run`` is in :mod:`.main_job`)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from applications.edge_kd.config import KDAppConfig
from core.runtime.errors import UserError, user_errors
from core.runtime.plotting import tsv


def _runs_dir(*parts: str) -> Path:
    from core.runtime.tracking import project_root

    return project_root().joinpath("runs", "kd", *parts)


def _out_path(out: str | None, default: Path) -> Path:
    path = Path(out) if out else default
    if path.is_dir():
        path = path / default.name
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"--out {out}: {path.parent} is not a directory")
    return path


# -- calibrate ----------------------------------------------------------------------------------------
def calibrate_command(*, out: str | None, name: str, storage: int, ram: int | None, max_latency_ms: float,
                      bytes_per_param: int, repeats: int) -> int:
    from applications.edge_kd.profiles import calibrate, machine_memory_bytes
    from core.runtime.tracking import Tracker

    for flag, value in {"--storage": storage, "--max-latency-ms": max_latency_ms, "--repeats": repeats,
                        "--bytes-per-param": bytes_per_param, "--ram": 1 if ram is None else ram}.items():
        if not value > 0:
            raise UserError(f"{flag} must be > 0; got {value}")
    path = _out_path(out, _runs_dir("devices", "this-machine.yaml"))
    profile, latency = calibrate(name=name, storage_bytes=storage, ram_bytes=ram or machine_memory_bytes(),
                                 max_latency_s=max_latency_ms / 1e3, bytes_per_param=bytes_per_param, repeats=repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# measured by deepzero kd calibrate: P_eff of DeepZero's depth-3 width-32 CNN, batch 1\n"
                    + profile.to_yaml())
    with Tracker("kd", run_name="calibrate") as tr:
        tr.set_tags({"deepzero.verb": "calibrate"})
        tr.log_params({f"profile.{k}": v for k, v in asdict(profile).items()})
        tr.log_metrics({"flops_per_s": profile.flops_per_s, "reference_latency_s": latency})
        tr.log_artifact(path, "devices")
    print(profile.to_yaml(), end="")
    print(f"reference latency {latency * 1e3:.3f} ms; saved {path}  (use: --device {path})")
    return 0


# -- design -------------------------------------------------------------------------------------------
def design_command(cfg: KDAppConfig, *, out: str | None) -> int:
    from applications.edge_kd.design import constraint_row, format_table
    from applications.edge_kd.profiles import load_profile
    from applications.edge_kd.train import design_for, load_data, teacher_for
    from core.runtime.config import flatten
    from core.runtime.tracking import Tracker

    profile = load_profile(cfg.device.profile)
    with user_errors():
        data, val = load_data(cfg)
    teacher = teacher_for(cfg, data)
    spec, design, student = design_for(cfg, data, teacher.spec, val)
    rows = [constraint_row(k, v, student.budgets[k]) for k, v in student.values.items()]
    text = format_table(rows)
    kw = spec["kwargs"]
    name = f"student-{profile.name.split()[0].lower()}-d{kw['depth']}w{kw['width']}.json"
    path = _out_path(out, _runs_dir("designs", name))
    record = {"device": asdict(profile), "spec": spec, "constraints": rows,
              "summary": design.summary() if design else None, "probes": design.probes if design else [],
              "teacher": {"description": teacher.description, "flops": teacher.flops}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    with Tracker("kd", experiment=cfg.run.experiment, run_name=f"design-{profile.name}") as tr:
        tr.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("device.", "student.", "teacher."))})
        tr.set_tags({"deepzero.verb": "design", "student": f"cnn-d{kw['depth']}-w{kw['width']}"})
        tr.log_metrics({"student_params": student.params, "student_forward_flops": student.flops,
                        "fits": float(student.fits)})
        tr.log_text(text, "design/constraints.txt")
        tr.log_text(tsv(rows), "design/constraints.tsv")
        tr.log_artifact(path, "design")
    teacher_flops = f"{teacher.flops / 1e6:.3g} MFLOPs" if teacher.flops else "unknown FLOPs (query-only)"
    print(f"teacher: {teacher.description}, {teacher_flops}")
    if design:
        how = f"closed form width {design.closed_form_width:.1f}, {len(design.probes)} candidates measured"
    else:
        how = "fixed by student.depth/width" + ("" if student.fits else f"; VIOLATES {', '.join(student.violated)}")
    print(f"student for {profile.name}: cnn depth {kw['depth']} width {kw['width']}, {student.params} parameters, "
          f"{student.flops / 1e6:.3g} MFLOPs per image ({how})")
    print(text, end="")
    print(f"saved {path}")
    return 0


# -- export -------------------------------------------------------------------------------------------
def export_command(checkpoint: str, *, profile_spec: str | None, out: str | None, repeats: int) -> int:
    from applications.edge_kd.design import format_table
    from applications.edge_kd.profiles import load_profile
    from core.models import from_spec
    from core.runtime.checkpoint import load_checkpoint
    from core.runtime.data import load_dataset
    from core.runtime.tracking import Tracker

    if repeats < 1:
        raise UserError(f"--repeats must be >= 1; got {repeats}")
    profile = load_profile(profile_spec) if profile_spec else None
    state = load_checkpoint(checkpoint, app="kd")
    cfg = state["config"]
    profile = profile or load_profile(cfg["device"]["profile"])
    with user_errors("checkpoint: "):
        model = from_spec(state["model_spec"], state["model"]).eval()
        data = load_dataset(cfg["data"]["name"], cfg["data"]["data_root"], image_size=cfg["data"]["image_size"],
                            normalize=False)
    source = state.get("mlflow_run_id") or "run"
    path = _out_path(out, _runs_dir(source, "student.onnx"))
    result = deployment_result(model, data, path, profile, check_samples=cfg["export"]["check_samples"],
                               repeats=repeats)
    rows = result["rows"]
    with Tracker("kd", experiment=cfg["run"].get("experiment"), run_name=f"export-{source[:8]}") as tr:
        tr.set_tags({"deepzero.verb": "export", "deepzero.source_run": source, "device_profile": profile.name})
        tr.log_params({"checkpoint": str(checkpoint), "device": profile.name})
        tr.log_metrics({k: v for k, v in result.items() if isinstance(v, float)})
        tr.log_artifact(path, "export")
        tr.log_text(format_table(rows), "export/constraints.txt")
        tr.log_text(tsv(rows), "export/constraints.tsv")
    print_export(result, profile.name)
    print(f"saved {path}  (logged as run {tr.run_id})")
    return 0


def deployment_result(model, data, path: Path, profile, *, check_samples: int, repeats: int) -> dict[str, Any]:
    """The deployment check plus the constraint table, the measured latency beside the FLOP estimate."""
    from applications.edge_kd.design import constraint_row, measure
    from applications.edge_kd.export import ExportMismatch, deployment_check
    from core.models import model_spec

    try:
        result = deployment_check(model, data.input_shape, data.test.x[:check_samples], path, profile=profile,
                                  repeats=repeats)
    except ExportMismatch as exc:
        raise UserError(f"export refused: {exc}") from None
    student = measure(model_spec(model), data.input_shape, profile)
    rows = [constraint_row(k, v, student.budgets[k]) for k, v in student.values.items()]
    rows.insert(2, constraint_row("latency (onnxruntime, scaled)", result["latency_device_measured_s"],
                                  profile.max_latency_s))
    return {**result, "rows": rows}


def print_export(result: dict[str, Any], device: str) -> None:
    from applications.edge_kd.design import format_table

    print(f"ONNX vs PyTorch: max |difference| {result['onnx_max_abs_diff']:.2e} (tolerance 1e-05)")
    print(f"latency here, one image: PyTorch {result['latency_torch_s'] * 1e3:.3f} ms, onnxruntime "
          f"{result['latency_onnxruntime_s'] * 1e3:.3f} ms; on {device}: "
          f"{result['latency_device_flops_s'] * 1e3:.3f} ms "
          f"by FLOPs, {result['latency_device_measured_s'] * 1e3:.3f} ms scaled from onnxruntime")
    print(format_table(result["rows"]), end="")
