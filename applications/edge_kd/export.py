"""Deployment check: the student as ONNX, checked against PyTorch and timed with onnxruntime.

The exported graph takes ``x [N, C, H, W]`` pixels in [0, 1] (the normalisation is its first layer)
and returns logits ``[N, K]``; the batch dimension is dynamic. onnxruntime's outputs must equal
PyTorch's within ``1e-5`` (absolute) on real test images, or the export is refused.

Latency is measured here, on one image at a time (median of many runs), and scaled to a device by
the ratio of effective speeds: t_device = t_here · P_here / P_device, with P_here this machine's
effective FLOP/s measured on the calibration workload (:func:`applications.edge_kd.profiles.effective_flops`).
The scaled number goes into the constraint table next to the FLOP-based estimate F / P_device.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TOLERANCE = 1e-5


class ExportMismatch(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch dimension; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with warnings.catch_warnings():                   # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    return path


def session(path: str | Path):
    """A single-threaded onnxruntime CPU session on ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def max_difference(model: nn.Module, sess, x: torch.Tensor) -> float:
    """Largest absolute difference between PyTorch's and onnxruntime's logits on ``x``."""
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = sess.run(None, {"x": x.numpy().astype(np.float32)})[0]
    return float(np.abs(ref - got).max())


def latencies(model: nn.Module, sess, input_shape: tuple[int, ...], *, repeats: int) -> dict[str, float]:
    """Median single-image latency (s) with PyTorch and with onnxruntime, measured alternately."""
    from applications.edge_kd.profiles import measure_seconds

    x = torch.rand(1, *input_shape)
    xn = x.numpy()
    with torch.no_grad():
        t_torch = measure_seconds(lambda: model(x), repeats=repeats)
    t_ort = measure_seconds(lambda: sess.run(None, {"x": xn}), repeats=repeats)
    return {"latency_torch_s": t_torch, "latency_onnxruntime_s": t_ort}


def deployment_check(model: nn.Module, input_shape: tuple[int, ...], x_check: torch.Tensor, path: str | Path, *,
                     profile, repeats: int, host_flops_per_s: float | None = None) -> dict[str, Any]:
    """Export, verify within :data:`TOLERANCE`, time, and scale to ``profile``; returns the numbers.

    Raises:
        ExportMismatch: onnxruntime disagrees with PyTorch by more than the tolerance.
    """
    from applications.edge_kd.counters import forward_flops
    from applications.edge_kd.profiles import effective_flops

    model = model.eval()
    path = export_onnx(model, input_shape, path)
    sess = session(path)
    diff = max_difference(model, sess, x_check)
    if not diff <= TOLERANCE:
        del sess
        Path(path).unlink(missing_ok=True)         # a refused export leaves no .onnx to deploy by mistake
        raise ExportMismatch(f"onnxruntime's logits differ from PyTorch's by {diff:.3g} > {TOLERANCE:g}")
    times = latencies(model, sess, input_shape, repeats=repeats)
    host = host_flops_per_s or effective_flops()[0]
    flops = forward_flops(model, input_shape)
    return {"onnx_path": str(path), "onnx_max_abs_diff": diff, "onnx_bytes": path.stat().st_size,
            **times, "host_flops_per_s": host, "forward_flops": flops,
            "latency_device_flops_s": flops / profile.flops_per_s,
            "latency_device_measured_s": times["latency_onnxruntime_s"] * host / profile.flops_per_s}
