"""Image classifiers of the DeepZero experiments (Chen et al., ICLR 2024), all traceable by torch.fx.

Plain layers only, so the fast CGE engine (:mod:`core.engine`) can analyse them layer by layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def small_cnn(depth: int = 3, width: int = 18, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """DeepZero's adjustable CNN: ``depth`` × [conv3×3 → BN → ReLU → maxpool2], global avg pool, Linear.

    Width 18: 406 / 3,376 / 6,346 / 9,316 / 12,286 parameters for depth 1–5 on one-channel (MNIST)
    inputs, and 730 / 3,700 / 6,670 / 9,640 / 12,610 on three-channel (CIFAR) inputs as in the paper.

    Args:
        depth: number of conv blocks; each halves the image side.
        width: channels of every conv block.
        in_channels: input channels C of ``[B, C, H, W]`` images.
        num_classes: logits out, ``[B, num_classes]``.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"cnn needs depth >= 1 and width >= 1; got depth={depth}, width={width}")
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; 28×28 inputs are padded to 32×32.

    61,706 parameters on ``[B, 1, 28, 28]`` MNIST inputs.
    """
    pad = 2 if image_size == 28 else 0
    side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"lenet5 needs images of at least 28×28; got {image_size}×{image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes))


class _BasicBlock(nn.Module):
    """ResNet basic block with the option-A (parameter-free) shortcut of He et al. 2016 for CIFAR."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else 0
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016) for 32×32 inputs: 3 stages × 3 blocks, 16/32/64 channels.

    269,722 parameters for 3 input channels and 10 classes, as in DeepZero's CIFAR-10 experiments.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))         # [B, 64, H/4, W/4]
        return self.fc(torch.flatten(self.pool(x), 1))
