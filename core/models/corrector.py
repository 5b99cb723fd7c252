"""A small conv corrector for 2-D fields (solver-in-the-loop correction, Um et al. 2020, NeurIPS,
"Solver-in-the-Loop: Learning from Differentiable Physics to Interact with Iterative PDE-Solvers",
arXiv:2007.00016).
"""
from __future__ import annotations

import torch
from torch import nn


class FieldCorrector(nn.Module):
    """Correction Δs = N([s, c]) of a 1-D or 2-D field s from the field and its conditioning planes c.

    Input ``[B, field_channels + cond_channels, *spatial]`` (``dims`` spatial axes): the field's
    channels (e.g. the two velocity components) followed by the conditioning channels (e.g. the
    Reynolds number broadcast to a plane); output ``[B, field_channels, *spatial]``, the correction to
    add. N = conv+ReLU, (depth − 2) × [conv+ReLU], conv, with ``kernel_size`` convs of ``width``
    channels and 'same' padding (``padding_mode="circular"`` for periodic domains). Optional fixed
    scales (buffers, never trained): each input channel is divided by ``in_scale[c]`` and each
    output channel multiplied by ``out_scale[c]``, so the network sees and emits O(1) values.

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
        dims: spatial axes, 1 or 2.
        padding_mode: ``"zeros"`` or ``"circular"`` (periodic).
        in_scale: one positive scale per input channel (default 1).
        out_scale: one positive scale per output channel (default 1).
    """

    def __init__(self, field_channels: int = 2, cond_channels: int = 1, width: int = 8, depth: int = 3,
                 kernel_size: int = 5, dims: int = 2, padding_mode: str = "zeros",
                 in_scale: list | None = None, out_scale: list | None = None) -> None:
        super().__init__()
        bad = min(field_channels, width, kernel_size) < 1 or cond_channels < 0 or depth < 2
        if dims not in (1, 2) or padding_mode not in ("zeros", "circular"):
            raise ValueError(f"corrector needs dims 1 or 2 and padding_mode 'zeros' or 'circular'; got dims={dims}, "
                             f"padding_mode={padding_mode!r}")
        cin = field_channels + cond_channels
        for name, scale, n in (("in_scale", in_scale, cin), ("out_scale", out_scale, field_channels)):
            if scale is not None and (len(scale) != n or not all(float(v) > 0 for v in scale)):
                raise ValueError(f"corrector {name} needs {n} positive values; got {scale}")
        if bad or kernel_size % 2 == 0:
            raise ValueError(f"corrector needs field_channels >= 1, cond_channels >= 0, width >= 1, "
                             f"depth >= 2 and an odd kernel_size; got field_channels={field_channels}, "
                             f"cond_channels={cond_channels}, width={width}, depth={depth}, "
                             f"kernel_size={kernel_size}")
        self.field_channels, self.cond_channels = field_channels, cond_channels
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        kw = dict(padding=kernel_size // 2, padding_mode=padding_mode)
        layers: list[nn.Module] = [conv(cin, width, kernel_size, **kw), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [conv(width, width, kernel_size, **kw), nn.ReLU()]
        last = conv(width, field_channels, kernel_size, **kw)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        shape = (1, -1) + (1,) * dims
        self.register_buffer("in_scale", torch.tensor([float(v) for v in (in_scale or [1.0] * cin)]).reshape(shape))
        self.register_buffer("out_scale",
                             torch.tensor([float(v) for v in (out_scale or [1.0] * field_channels)]).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / self.in_scale) * self.out_scale
