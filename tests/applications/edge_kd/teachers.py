"""Query-only teachers for the tests, loaded by import path (``tests.applications.edge_kd.teachers:NAME``).

Each is a fixed random linear map of the pixels to 10 logits, so its answers are deterministic.
"""
import torch


def _logits(x: torch.Tensor) -> torch.Tensor:
    w = torch.randn(x[0].numel(), 10, generator=torch.Generator().manual_seed(7))
    return x.reshape(len(x), -1) @ w


def linear(x):
    """A working teacher: x [N, 1, 28, 28] -> logits [N, 10]."""
    return _logits(x)


def unreachable(x):
    """A teacher whose API never answers."""
    raise ConnectionError("teacher API at 10.0.0.7:9000 refused the connection")


def three_classes(x):
    """A teacher of another task: 3 logits per image."""
    return _logits(x)[:, :3]


class FailsDuringTraining:
    """Answers the two evaluation calls (validation, test) and the first training call, then fails."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        if self.calls > 3:
            raise TimeoutError("teacher API timed out after 30 s")
        return _logits(x)


class ThreeChannelNet(torch.nn.Module):
    """A model for RGB images: fails on MNIST's one channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 10, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))
