"""Small models covering every layer type the fast CGE engine handles (and some it does not)."""
import torch
from torch import nn
import torch.nn.functional as F


def small_cnn(depth=2, in_ch=1, width=6, classes=5):
    layers, c = [], in_ch
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def mlp(d_in=12, hidden=8, classes=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.Tanh(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class ResBlockNet(nn.Module):
    """A residual block (functional add and relu), strided conv, avg-pool and flatten."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, stride=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, c, 2, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(c * 2 * 2, classes)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        r = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(self.bn2(self.conv2(r)) + h)
        h = self.pool(self.down(h))
        return self.fc(torch.flatten(h, 1))


class Odd(nn.Module):
    """Layers without a closed form: LayerNorm, Conv1d, a shared Linear, a functional weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, padding=1)
        self.norm = nn.LayerNorm(10)
        self.shared = nn.Linear(10, 10)
        self.scale = nn.Parameter(torch.randn(10))
        self.out = nn.Linear(30, 3)

    def forward(self, x):
        h = self.norm(self.conv(x.reshape(x.shape[0], 1, 10)))       # [B, 3, 10]
        h = torch.tanh(self.shared(self.shared(h)) * self.scale)
        return self.out(h.reshape(h.shape[0], -1))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > 0:   # data-dependent control flow: not traceable by torch.fx
            return self.fc(x)
        return self.fc(-x)
