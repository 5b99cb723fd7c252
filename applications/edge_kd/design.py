"""Designing the student for a device: closed-form multipliers, then a search with real counters.

EarlyLight (Mishra & Gupta) derives the student from the teacher under the device's storage,
processing speed and deadline. For a student θ_S with per-sample forward FLOPs F and b bytes per
parameter on a device with storage S, effective speed P_eff, deadline T_max and RAM M:

    storage        b·|θ_S|                         ≤ S
    latency        F / P_eff                       ≤ T_max
    inference RAM  b·|θ_S| + peak activations      ≤ M
    training RAM   measured peak of one training step (backprop, or forward-only MeZO)  ≤ M   (optional)

The student family is DeepZero's CNN (``depth`` blocks of ``width`` channels) behind the data's
normalisation. Parameters and FLOPs scale ~w² in the width multiplier w, so the closed form
w₀ = W_ref·sqrt(min(S / (b·|θ_ref|), P_eff·T_max / F_ref)) gives the first probe of a binary
search over widths that are multiples of 8, each probe judged by the real counters
(:mod:`applications.edge_kd.counters`). The depth multiplier stays 1 (the reference's depth)
unless even the narrowest student of that depth fails; then the depth drops one block at a time.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from applications.edge_kd.counters import forward_flops, num_params, param_bytes, peak_activation_bytes
from applications.edge_kd.profiles import DeviceProfile
from core.runtime.errors import UserError

STEP = 8                                   # channels are multiples of 8 (vector lanes of edge kernels)


@dataclass
class Candidate:
    depth: int
    width: int
    params: int
    flops: float                            # forward FLOPs per sample
    values: dict[str, float]                # constraint -> value
    budgets: dict[str, float]               # constraint -> budget

    @property
    def violated(self) -> list[str]:
        return [k for k, v in self.values.items() if v > self.budgets[k]]

    @property
    def fits(self) -> bool:
        return not self.violated


@dataclass
class Design:
    profile: DeviceProfile
    student: Candidate
    spec: dict[str, Any]                    # core.models.model_spec of the student
    reference: dict[str, Any]               # depth, width, params, flops of the design's starting point
    closed_form_width: float
    probes: list[tuple[int, int, bool]] = field(default_factory=list)   # (depth, width, fits) in order

    def rows(self) -> list[dict[str, Any]]:
        """The constraint table: constraint, value, budget, slack (budget − value) and slack in %."""
        return [constraint_row(k, v, self.student.budgets[k]) for k, v in self.student.values.items()]

    def summary(self) -> dict[str, Any]:
        s = self.student
        return {"device": self.profile.name, "depth": s.depth, "width": s.width, "params": s.params,
                "flops": s.flops, "reference_depth": self.reference["depth"],
                "reference_width": self.reference["width"], "closed_form_width": round(self.closed_form_width, 2),
                "probes": len(self.probes)}


UNITS = {"storage": "bytes", "latency (FLOPs / P_eff)": "s", "inference RAM": "bytes", "training RAM": "bytes",
         "latency (onnxruntime, scaled)": "s"}


def constraint_row(name: str, value: float, budget: float) -> dict[str, Any]:
    return {"constraint": name, "value": value, "budget": budget, "slack": budget - value,
            "slack_pct": 100.0 * (budget - value) / budget, "unit": UNITS.get(name, "")}


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.4g} ms"
    if unit == "bytes":
        for scale, suffix in ((1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.4g} {suffix}"
        return f"{value:.0f} B"
    return f"{value:.4g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of :func:`constraint_row` as an aligned text table."""
    lines = [f"{'constraint':<32} {'value':>12} {'budget':>12} {'slack':>12} {'slack %':>8}"]
    for r in rows:
        u = r["unit"]
        lines.append(f"{r['constraint']:<32} {_fmt(r['value'], u):>12} {_fmt(r['budget'], u):>12} "
                     f"{_fmt(r['slack'], u):>12} {r['slack_pct']:>7.1f}%")
    return "\n".join(lines) + "\n"


def student_spec(depth: int, width: int, input_shape: tuple[int, ...], num_classes: int,
                 normalize: dict[str, list[float]] | None) -> dict[str, Any]:
    """The zoo spec of a student CNN that takes [0, 1] pixels (the normalisation is its first layer)."""
    return {"arch": "cnn", "kwargs": {"depth": depth, "width": width, "in_channels": input_shape[0],
                                      "num_classes": num_classes, "image_size": input_shape[1]},
            "normalize": normalize}


TrainBytes = Callable[[dict[str, Any]], int]


def measure(spec: dict[str, Any], input_shape: tuple[int, ...], profile: DeviceProfile,
            train_bytes: TrainBytes | None = None) -> Candidate:
    """A student's constraint values by the real counters (see the module docstring)."""
    from core.models import from_spec

    model = from_spec(spec)
    b = profile.bytes_per_param
    flops = forward_flops(model, input_shape)
    weights = param_bytes(model, b)
    values = {"storage": float(weights), "latency (FLOPs / P_eff)": flops / profile.flops_per_s,
              "inference RAM": float(weights + peak_activation_bytes(model, input_shape, b))}
    budgets = {"storage": float(profile.storage_bytes), "latency (FLOPs / P_eff)": profile.max_latency_s,
               "inference RAM": float(profile.ram_bytes)}
    if train_bytes is not None:
        values["training RAM"] = float(train_bytes(spec) * b / 4)
        budgets["training RAM"] = float(profile.ram_bytes)
    kw = spec["kwargs"]
    return Candidate(kw["depth"], kw["width"], num_params(model), flops, values, budgets)


def design_student(profile: DeviceProfile, *, input_shape: tuple[int, ...], num_classes: int,
                   normalize: dict[str, list[float]] | None, ref_depth: int, ref_width: int,
                   train_bytes: TrainBytes | None = None) -> Design:
    """The deepest, then widest, student CNN meeting every constraint of ``profile``.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        ref_depth, ref_width: the starting point (the teacher's, when it is a zoo CNN); the width
            multiplier is at most 1 (a student no wider than it, rounded up to a multiple of 8).
        train_bytes: ``spec -> bytes`` of one measured training step (fp32), when the student must
            also train on the device.
    Raises:
        UserError: nothing fits — one line naming the smallest student's violated constraints.
    """
    side = min(input_shape[1:])
    max_depth = max(1, min(ref_depth, int(math.log2(side))))
    top = max(STEP, STEP * math.ceil(ref_width / STEP))
    grid = list(range(STEP, top + 1, STEP))
    ref = measure(student_spec(max_depth, ref_width, input_shape, num_classes, normalize), input_shape, profile)
    b = profile.bytes_per_param
    ratio = min(profile.storage_bytes / (b * ref.params), profile.max_flops / ref.flops, 1.0)
    w0 = ref_width * math.sqrt(ratio)
    probes: list[tuple[int, int, bool]] = []
    seen: dict[tuple[int, int], Candidate] = {}

    def judge(depth: int, i: int) -> bool:
        key = (depth, grid[i])
        if key not in seen:
            seen[key] = measure(student_spec(depth, grid[i], input_shape, num_classes, normalize), input_shape,
                                profile, train_bytes)
            probes.append((depth, grid[i], seen[key].fits))
        return seen[key].fits

    for depth in range(max_depth, 0, -1):
        lo, hi = 0, len(grid) - 1                    # the answer is the largest fitting index in [lo, hi]
        first = min(hi, max(0, int(w0 // STEP) - 1))  # the closed form, rounded down to the grid
        best = None
        if judge(depth, first):
            best, lo = first, first + 1
        else:
            hi = first - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if judge(depth, mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best is not None:
            chosen = seen[(depth, grid[best])]
            reference = {"depth": max_depth, "width": ref_width, "params": ref.params, "flops": ref.flops}
            return Design(profile, chosen, student_spec(depth, grid[best], input_shape, num_classes, normalize),
                          reference, w0, probes)
    smallest = seen[(1, grid[0])]
    why = "; ".join(f"{k} {_fmt(smallest.values[k], UNITS[k])} > {_fmt(smallest.budgets[k], UNITS[k])}"
                    for k in smallest.violated)
    raise UserError(f"no student fits device profile '{profile.name}': even the smallest (cnn depth 1, width "
                    f"{grid[0]}) needs {why}")
