"""One seed controls everything: Python's ``random``, NumPy's global stream and torch (CPU and CUDA)."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gpu(device: Any) -> torch.device | None:
    """``device`` when it is a CUDA device, else None."""
    device = torch.device(device) if device is not None else None
    return device if device is not None and device.type == "cuda" else None


def get_rng_state(device: Any = None) -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts (tensors and plain Python values).

    ``device``: the run's device; a CUDA device adds that GPU's generator (only that one: a resume
    may see another number of GPUs, and restores it into the GPU it runs on).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    gpu = _gpu(device)
    if gpu is not None:
        state["cuda"] = torch.cuda.get_rng_state(gpu)
    return state


def set_rng_state(state: dict[str, Any], device: Any = None) -> None:
    """Restore :func:`get_rng_state`'s states; a saved GPU generator goes to ``device``'s GPU."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    gpu, cuda = _gpu(device), state.get("cuda")
    if isinstance(cuda, (list, tuple)):        # older checkpoints: one state per GPU then visible; GPU 0's
        cuda = cuda[0] if cuda else None
    if cuda is not None and gpu is not None:
        torch.cuda.set_rng_state(cuda, gpu)
