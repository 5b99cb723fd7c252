"""Input normalisation as a layer, so a model can take pixels in [0, 1].

Randomized smoothing (Cohen et al. 2019) adds its Gaussian noise in pixel space; with the
normalisation as the model's first layer the smoothed classifier and its denoiser see pixels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x − mean_c) / std_c per channel c of ``[B, C, H, W]`` inputs.

    ``mean`` and ``std`` are buffers (they follow ``.to(device)`` and are saved in the state dict).

    Args:
        mean: per-channel means (one value per channel; one value for a one-channel image).
        std: per-channel standard deviations, all > 0.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if not mean or len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"Normalize needs as many means as stds (one per channel) and every std > 0; "
                             f"got mean={mean}, std={std}")
        self.values = {"mean": mean, "std": std}                   # exact floats, for model specs
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))   # [1, C, 1, 1]
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.values['mean']}, std={self.values['std']}"
