"""DnCNN denoiser (Zhang et al. 2017, "Beyond a Gaussian Denoiser: Residual Learning of Deep CNN for
Image Denoising", IEEE TIP, arXiv:1608.03981), the denoiser D of denoised smoothing (Salman et al. 2020).
"""
from __future__ import annotations

import torch
from torch import nn


class DnCNN(nn.Module):
    """Residual denoiser D(x) = x − R(x): the body R predicts the noise.

    R = conv3×3+ReLU → (depth − 2) × [conv3×3 → BN → ReLU] → conv3×3, all with ``width`` channels
    and the image's side kept. As in Zhang et al. (and Salman et al.'s copy) the middle convs have
    no bias (BN follows) and neither has the last one.

    Deviation from the paper: the last conv is zero-initialised, so D starts as the identity
    (D(x) = x exactly) and fine-tuning starts from "no denoising" — the usual start when a
    pre-trained classifier sits behind D. Its ReLUs are not in-place, so the fast CGE engine can
    analyse it (forward is ``x - self.body(x)``, traceable by torch.fx).

    Args:
        in_channels: image channels C; input and output are ``[B, C, H, W]``.
        depth: conv layers in R (≥ 2); 17 in the paper (558,400 parameters at width 64, C = 3).
        width: channels of the hidden convs (64 in the paper).
    """

    def __init__(self, in_channels: int = 3, depth: int = 17, width: int = 64) -> None:
        super().__init__()
        if depth < 2 or width < 1 or in_channels < 1:
            raise ValueError(f"dncnn needs depth >= 2, width >= 1, in_channels >= 1; got depth={depth}, "
                             f"width={width}, in_channels={in_channels}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        last = nn.Conv2d(width, in_channels, 3, padding=1, bias=False)
        nn.init.zeros_(last.weight)
        layers.append(last)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)                                # x − R(x): R estimates the noise
