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


# -- models users bring: outputs, recurrent layers, in-place ops, tied weights, black boxes ---------
class DictOut(nn.Module):
    """Returns a dict (a dict-aware loss reads ``out["logits"]``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        return {"logits": self.fc2(torch.tanh(self.fc1(x)))}


class TupleOut(nn.Module):
    """Returns (logits, features)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h), h


class RecurrentNet(nn.Module):
    """An ``nn.GRU`` or ``nn.LSTM`` (their output is a tuple) read at the last step, then a Linear."""

    def __init__(self, cell="gru"):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)                  # running stats: must survive a refused estimate
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(3, 5, batch_first=True)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):                              # x: [B, 4, 3]
        h, _ = self.rnn(self.norm(x))
        return self.fc(h[:, -1])


class TrainOnlyBranch(nn.Module):
    """Python control flow on ``self.training``: torch.fx freezes the branch taken when tracing."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.training:
            h = h * 0.5
        return self.fc2(h)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x, scale=None):
        return self.fc(x) if scale is None else self.fc(x) * scale


class InplaceReluCNN(nn.Module):
    """``nn.ReLU(inplace=True)`` right after a conv and after a BN (torchvision style)."""

    def __init__(self, c=4, classes=5):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, c, 3, padding=1), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(c * 4, classes)

    def forward(self, x):
        h = self.relu1(self.conv1(x))
        h = self.relu2(self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


class InplaceResBlock(nn.Module):
    """torchvision's BasicBlock idiom: ``out += identity`` then ``F.relu(out, inplace=True)``."""

    def __init__(self, c=4, classes=5):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        identity = F.relu(self.bn0(self.stem(x)), inplace=True)
        out = self.bn1(self.conv1(identity))
        out += identity
        out = F.relu(out, inplace=True)
        return self.fc(out.mean((2, 3)))


class InplaceMethods(nn.Module):
    """``h.add_(...)`` without reassignment, ``torch.relu_`` and ``leaky_relu(..., inplace=True)``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.skip, self.fc2 = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc1(x)
        h.add_(self.skip(x), alpha=0.5)                 # eager: h now holds the sum
        h = torch.relu_(h)
        h = F.leaky_relu(h * 2.0, 0.1, True)
        return self.fc2(h)


class AliasedIadd(nn.Module):
    """``h += 1`` while ``g`` still names h: eager reads the updated h through g; torch.fx does not."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc1(x)
        g = h
        h += 1.0
        return self.fc2(g * h)


class AliasedView(nn.Module):
    """``v`` is a view of h; ``h.relu_()`` changes what v reads later."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        v = h.view(h.shape[0], 2, 4)
        h = h.relu_()
        return self.fc2(torch.cat([h, v.flatten(1)], 1))


def hidden_inplace_blackbox():
    """A BlackBox whose callable scales its input in place: invisible to torch.fx."""
    from core import BlackBox

    def scale_in_place(z):
        return z.mul_(2.0).tanh()

    return nn.Sequential(nn.Linear(12, 8), BlackBox(scale_in_place, name="scaler"), nn.Linear(8, 4))


class TiedLinear(nn.Module):
    """One Parameter used by two layers (``fc2.weight is fc1.weight``)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 6)
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(self.inp(x))))))


def blackbox_middle():
    """A query-only stage between trainable layers (fed K·B samples at once by the engine)."""
    from core import BlackBox

    torch.manual_seed(7)
    frozen = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).double().requires_grad_(False)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), BlackBox(frozen, name="frozen"), nn.Linear(8, 4))


class TinyDnCNN(nn.Module):
    """DnCNN's residual learning (Zhang et al. 2017): the output is the input minus the predicted noise."""

    def __init__(self, c=1, width=4, depth=3, op="operator"):
        super().__init__()
        layers = [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(width, c, 3, padding=1)]
        self.body, self.op = nn.Sequential(*layers), op

    def forward(self, x):
        if self.op == "torch.sub":
            return torch.sub(x, self.body(x))
        if self.op == "method":
            return x.sub(self.body(x))
        if self.op == "reversed":                        # operand order: the branch first
            return self.body(x) - x
        return x - self.body(x)


class Gated(nn.Module):
    """A gate: ``sigmoid(g(x)) · v(x)``, then a product/quotient with constants and a difference."""

    def __init__(self):
        super().__init__()
        self.g, self.v, self.out = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.sigmoid(self.g(x)) * self.v(x)
        h = 1.0 - h / 2.0
        return self.out(h)


class GatedConv(nn.Module):
    """A channel gate on conv features (Chan perturbations meet an unchanged branch in ``a * b``)."""

    def __init__(self, c=3):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(1, c, 3, padding=1)
        self.bn, self.pool = nn.BatchNorm2d(c), nn.MaxPool2d(2)
        self.fc = nn.Linear(c * 16, 5)

    def forward(self, x):                              # x: [B, 1, 8, 8]
        h = torch.tanh(self.bn(self.a(x))) * self.b(x)
        return self.fc(torch.flatten(self.pool(h), 1))
