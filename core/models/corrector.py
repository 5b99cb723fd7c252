"""A small conv corrector for 2-D fields (solver-in-the-loop correction, Um et al. 2020, NeurIPS,
"Solver-in-the-Loop: Learning from Differentiable Physics to Interact with Iterative PDE-Solvers",
arXiv:2007.00016).
"""
from __future__ import annotations

import torch
from torch import nn


class FieldCorrector(nn.Module):
    """Correction Δs = N([s, c]) of a 2-D field s from the field and its conditioning planes c.

    Input ``[B, field_channels + cond_channels, H, W]``: the field's channels (e.g. the two velocity
    components) followed by the conditioning channels (e.g. the Reynolds number broadcast to a plane);
    output ``[B, field_channels, H, W]``, the correction to add. N = conv+ReLU, (depth − 2) ×
    [conv+ReLU], conv, with ``kernel_size`` convs of ``width`` channels and 'same' padding.

    Deviation from Um et al. (5×5 convs, 32 channels, residual blocks, ~260k parameters): a few
    thousand parameters by default (2,618 at the defaults: 2 field + 1 conditioning channels),
    small enough for coordinate-wise ZO; and the last conv is zero-initialised so the corrector
    starts as "no correction" (the coarse solver alone).

    Args:
        field_channels: channels of the field, and of the correction.
        cond_channels: conditioning channels appended to the input (0 for none).
        width: hidden channels.
        depth: conv layers (≥ 2).
        kernel_size: odd conv kernel side.
    """

    def __init__(self, field_channels: int = 2, cond_channels: int = 1, width: int = 8, depth: int = 3,
                 kernel_size: int = 5) -> None:
        super().__init__()
        bad = min(field_channels, width, kernel_size) < 1 or cond_channels < 0 or depth < 2
        if bad or kernel_size % 2 == 0:
            raise ValueError(f"corrector needs field_channels >= 1, cond_channels >= 0, width >= 1, "
                             f"depth >= 2 and an odd kernel_size; got field_channels={field_channels}, "
                             f"cond_channels={cond_channels}, width={width}, depth={depth}, "
                             f"kernel_size={kernel_size}")
        self.field_channels, self.cond_channels = field_channels, cond_channels
        p = kernel_size // 2
        cin = field_channels + cond_channels
        layers: list[nn.Module] = [nn.Conv2d(cin, width, kernel_size, padding=p), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, kernel_size, padding=p), nn.ReLU()]
        last = nn.Conv2d(width, field_channels, kernel_size, padding=p)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
