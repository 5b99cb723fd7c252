"""Vetting a solver before training: shape, dtype, determinism, per-sample time at a few batch sizes."""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def _conditions(solver, batch: int, given: dict[str, Any]) -> dict[str, np.ndarray]:
    conds = dict(solver.default_conditions(batch)) if hasattr(solver, "default_conditions") else {}
    for key, value in given.items():
        arr = np.asarray(value, dtype=np.float64)
        conds[key] = np.full(batch, float(arr)) if arr.ndim == 0 else arr
    return conds


def _initial(solver, batch: int) -> np.ndarray:
    if hasattr(solver, "initial_state"):
        return solver.initial_state(batch)
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal((batch, *solver.state_shape))).astype(solver.dtype)


def check(solver, *, batch_sizes: tuple[int, ...] = (1, 8, 32), steps: int = 3,
          conditions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a few steps; report what a training loop needs to know."""
    conditions = conditions or {}
    report: dict[str, Any] = {"state_shape": tuple(solver.state_shape), "dtype": str(np.dtype(solver.dtype)),
                              "conditions": list(getattr(solver, "conditions", ()))}
    b = batch_sizes[0]
    s0, c0 = _initial(solver, b), _conditions(solver, b, conditions)
    a, c = solver.step(s0, **c0), solver.step(s0, **c0)
    report["deterministic"] = bool(a.tobytes() == c.tobytes())
    report["changes_state"] = bool(not np.array_equal(a, s0))
    timings = {}
    for batch in batch_sizes:
        s, conds = _initial(solver, batch), _conditions(solver, batch, conditions)
        s = solver.step(s, **conds)                      # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            s = solver.step(s, **conds)
        timings[batch] = (time.perf_counter() - t) / steps / batch
    report["seconds_per_sample_step"] = timings
    return report


def format_report(spec: str, report: dict[str, Any]) -> str:
    lines = [f"solver          {spec}",
             f"state_shape     {report['state_shape']}",
             f"dtype           {report['dtype']}",
             f"conditions      {', '.join(report['conditions']) or '-'}",
             f"deterministic   {'yes' if report['deterministic'] else 'NO (same input gave different bytes)'}",
             f"changes state   {'yes' if report['changes_state'] else 'NO (step returned its input)'}",
             "batch  ms/sample-step"]
    lines += [f"{b:>5}  {t * 1e3:14.3f}" for b, t in report["seconds_per_sample_step"].items()]
    return "\n".join(lines) + "\n"
