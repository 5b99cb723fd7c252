"""A small convolutional autoencoder for ZO-AE-DS (Zhang et al., ICLR 2022, "How to Robustify Black-Box
ML Models? A Zeroth-Order Optimization Perspective", arXiv:2203.14195).

ZO-AE-DS puts the black box behind a decoder: the pipeline is denoiser → encoder → z → decoder → f,
with the (frozen) decoder counted inside the black box, so the zeroth-order estimate is taken in the
low-dimensional latent z (d = 192 on CIFAR-10) and autograd carries it through encoder and denoiser.
"""
from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """``[B, C, H, W]`` → ``[B, latent_channels, H / 2^downsamples, W / 2^downsamples]``.

    conv3×3+ReLU, then ``downsamples`` × [conv4×4 stride 2 + ReLU] doubling the channels, then a
    conv3×3 to ``latent_channels`` (no activation: the latent is unbounded).
    """

    def __init__(self, in_channels: int, width: int, latent_channels: int, downsamples: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        c = width
        for _ in range(downsamples):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.ReLU()]
            c *= 2
        layers.append(nn.Conv2d(c, latent_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """The mirror of :class:`Encoder`: transposed convs 4×4 stride 2 halve the channels back.

    With ``bounded`` the output passes a sigmoid, i.e. pixels in (0, 1) as randomized smoothing's
    classifiers take them (normalisation is the classifier's own first layer).
    """

    def __init__(self, in_channels: int, width: int, latent_channels: int, downsamples: int,
                 bounded: bool) -> None:
        super().__init__()
        c = width * 2 ** downsamples
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1), nn.ReLU()]
        for _ in range(downsamples):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.ReLU()]
            c //= 2
        layers.append(nn.Conv2d(c, in_channels, 3, padding=1))
        if bounded:
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConvAutoencoder(nn.Module):
    """Encoder and decoder as separate submodules; ``forward(x) = decode(encode(x))``.

    The latent z has shape ``[B, latent_channels, H / 2^downsamples, W / 2^downsamples]``, so its
    dimension is d = latent_channels · H · W / 4^downsamples: the defaults give d = 3·8·8 = 192 on
    32×32 CIFAR-10 images, the latent size of ZO-AE-DS. H and W must be divisible by 2^downsamples.

    Args:
        in_channels: image channels C.
        width: channels of the first encoder conv (doubled at each down-sampling).
        latent_channels: channels of z.
        downsamples: stride-2 stages (each halves the side of z).
        bounded: end the decoder with a sigmoid (outputs in (0, 1)).
    """

    def __init__(self, in_channels: int = 3, width: int = 16, latent_channels: int = 3, downsamples: int = 2,
                 bounded: bool = True) -> None:
        super().__init__()
        if min(in_channels, width, latent_channels) < 1 or downsamples < 0:
            raise ValueError(f"autoencoder needs in_channels, width, latent_channels >= 1 and "
                             f"downsamples >= 0; got in_channels={in_channels}, width={width}, "
                             f"latent_channels={latent_channels}, downsamples={downsamples}")
        self.latent_channels, self.downsamples = latent_channels, downsamples
        self.encoder = Encoder(in_channels, width, latent_channels, downsamples)
        self.decoder = Decoder(in_channels, width, latent_channels, downsamples, bounded)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape of one sample's z for ``height × width`` images."""
        f = 2 ** self.downsamples
        if height % f or width % f:
            raise ValueError(f"autoencoder with downsamples={self.downsamples} needs image sides divisible "
                             f"by {f}; got {height}×{width}")
        return self.latent_channels, height // f, width // f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → z ``[B, latent_channels, H/2^k, W/2^k]``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z → reconstruction ``[B, C, H, W]``."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
