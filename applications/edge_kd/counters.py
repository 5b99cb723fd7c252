"""Real counters for the student's constraints: FLOPs, parameter bytes, and measured peak memory.

- FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on an actual forward (or training
  step): 2 FLOPs per multiply-add of every matmul and convolution, the one unit used everywhere
  (thop/ptflops report multiply-adds, half of this). Element-wise ops (BatchNorm, ReLU, pooling,
  the input normalisation) are not counted, as by every such counter.
- Memory is *measured*: :func:`peak_bytes` runs a function under the PyTorch profiler's memory
  accounting (``profile_memory=True``), which reports every allocation and free of the CPU/CUDA
  allocators, and returns the highest net number of bytes alive at any moment of the call —
  including kernels' temporary workspaces, which an estimate from tensor shapes would miss.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence

FP32_BYTES = 4


def forward_flops(model, input_shape: Sequence[int], *, batch: int = 1) -> float:
    """FLOPs of one forward of ``model`` on a ``[batch, *input_shape]`` zero input, per sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, *input_shape, device=_device(model))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was)
    return counter.get_total_flops() / batch


@contextlib.contextmanager
def counting_flops():
    """``with counting_flops() as flops: ...`` then ``flops()`` gives the FLOPs the block executed."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        yield lambda: counter.get_total_flops()


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def param_bytes(model, bytes_per_param: int) -> int:
    """b·|θ|: storage of every parameter at ``bytes_per_param`` bytes (buffers such as BN statistics fold)."""
    return num_params(model) * int(bytes_per_param)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Highest number of bytes allocated and not yet freed at any moment while ``fn()`` runs.

    Only allocations made during the call count (what existed before is the baseline). Measured with
    the PyTorch profiler's memory events, in order of time.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    import torch

    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with _quiet_native_stderr(), profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += int(e.nbytes())
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for the block: the profiler's C++ side logs every start and stop there.

    Python's own ``sys.stderr`` is flushed first; an exception raised in the block still propagates
    (and is reported after the descriptor is restored).
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:                                  # no descriptor 2 (a detached process): nothing to hide
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_activation_bytes(model, input_shape: Sequence[int], bytes_per_param: int, *, batch: int = 1) -> int:
    """Measured peak of inference memory beyond the weights: activations and kernel workspaces.

    Measured in fp32 and scaled to the device's width (``bytes_per_param / 4``): a device storing
    int8 weights stores int8 activations too.
    """
    import torch

    x = torch.zeros(batch, *input_shape, device=_device(model))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)                                       # warm-up: lazy one-time allocations stay out
            measured = peak_bytes(lambda: model(x))
    finally:
        model.train(was)
    return int(measured * bytes_per_param / FP32_BYTES)


def _device(model):
    import torch

    from core.blackbox import module_device

    return module_device(model) or torch.device("cpu")
