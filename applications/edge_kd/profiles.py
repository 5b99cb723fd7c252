"""Device profiles: what an edge device gives one model — storage, RAM, effective speed, a deadline.

A profile is a YAML mapping with exactly these keys (EarlyLight's device constraints, Mishra & Gupta)::

    name: Raspberry Pi 4          # shown in tables
    storage_bytes: 8388608        # S: room for the model's parameters
    ram_bytes: 67108864           # M: memory for inference (and on-device training, when asked)
    flops_per_s: 5.0e9            # P_eff: *measured* FLOP/s on small models at batch 1, not the peak
    max_latency_s: 0.0005         # T_max: deadline of one inference
    bytes_per_param: 4            # b: 4 fp32, 2 fp16, 1 int8 (activations are stored at the same width)

Presets live in ``devices/`` (``rpi4``, ``jetson-nano``, ``mcu``); a path to a user's own file works
the same. :func:`calibrate` measures this machine's P_eff and writes a profile of it.
FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from core.runtime.errors import UserError

DEVICE_DIR = Path(__file__).parent / "devices"
_NUMBERS = ("storage_bytes", "ram_bytes", "flops_per_s", "max_latency_s", "bytes_per_param")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    storage_bytes: int
    ram_bytes: int
    flops_per_s: float
    max_latency_s: float
    bytes_per_param: int

    @property
    def max_flops(self) -> float:
        """F_max = P_eff · T_max: the forward FLOPs per sample the deadline allows."""
        return self.flops_per_s * self.max_latency_s

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(asdict(self), sort_keys=False)


def presets() -> list[str]:
    return sorted(p.stem for p in DEVICE_DIR.glob("*.yaml"))


def from_mapping(data: Any, where: str) -> DeviceProfile:
    """A validated profile from a parsed mapping; every mistake is one :class:`UserError` line."""
    if not isinstance(data, dict):
        raise UserError(f"device profile {where} must be a YAML mapping with keys name, {', '.join(_NUMBERS)}")
    allowed = [f.name for f in fields(DeviceProfile)]
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise UserError(f"device profile {where}: unknown key '{unknown[0]}'; valid keys: {', '.join(allowed)}")
    missing = [k for k in allowed if k not in data]
    if missing:
        raise UserError(f"device profile {where} lacks '{missing[0]}'; a profile needs all of: {', '.join(allowed)}")
    values: dict[str, Any] = {"name": str(data["name"])}
    for key in _NUMBERS:
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"device profile {where}: '{key}' must be a positive number; got {v!r}")
        values[key] = v
    for key in ("storage_bytes", "ram_bytes", "bytes_per_param"):
        if float(values[key]) != int(values[key]):
            raise UserError(f"device profile {where}: '{key}' must be a whole number; got {values[key]!r}")
        values[key] = int(values[key])
    values["flops_per_s"], values["max_latency_s"] = float(values["flops_per_s"]), float(values["max_latency_s"])
    return DeviceProfile(**values)


def load_profile(spec: str) -> DeviceProfile:
    """A preset name (``rpi4``, ``jetson-nano``, ``mcu``) or the path of a profile YAML file."""
    import yaml

    spec = str(spec or "").strip()
    path = DEVICE_DIR / f"{spec}.yaml" if spec in presets() else Path(spec).expanduser()
    if not spec or not path.is_file():
        raise UserError(f"unknown device profile '{spec}': use a preset ({', '.join(presets())}) or the path of a "
                        "profile YAML file (deepzero kd calibrate writes one)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read device profile {path}: {str(exc).splitlines()[0]}") from None
    return from_mapping(data, str(path))


# -- calibration ------------------------------------------------------------------------------------
def reference_model():
    """The calibration workload: DeepZero's depth-3 CNN, width 32, on one 28×28 image (≈5 MFLOPs)."""
    from core.models import build_model

    return build_model("cnn", depth=3, width=32, in_channels=1, num_classes=10).eval()


def measure_seconds(fn, *, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def effective_flops(*, repeats: int = 50) -> tuple[float, float]:
    """(P_eff in FLOP/s, latency in s) of :func:`reference_model` on this machine, with PyTorch, batch 1."""
    import torch

    from applications.edge_kd.counters import forward_flops

    model = reference_model()
    x = torch.rand(1, 1, 28, 28)
    flops = forward_flops(model, (1, 28, 28))
    with torch.no_grad():
        latency = measure_seconds(lambda: model(x), repeats=repeats)
    return flops / latency, latency


def calibrate(*, name: str, storage_bytes: int, ram_bytes: int, max_latency_s: float, bytes_per_param: int,
              repeats: int = 50) -> tuple[DeviceProfile, float]:
    """This machine as a profile: measured P_eff with the given budgets; also returns the reference latency."""
    rate, latency = effective_flops(repeats=repeats)
    profile = from_mapping({"name": name, "storage_bytes": storage_bytes, "ram_bytes": ram_bytes,
                            "flops_per_s": float(f"{rate:.4g}"), "max_latency_s": max_latency_s,
                            "bytes_per_param": bytes_per_param}, "being calibrated")
    return profile, latency


def machine_memory_bytes() -> int:
    """Physical memory of this machine (Linux/macOS), for a calibrated profile's default RAM budget."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30
