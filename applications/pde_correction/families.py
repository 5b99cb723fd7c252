"""Problem families: what a simulation is (initial state, conditions), and how a solver state becomes
the corrector's input and its output a correction of the state.

A family knows its PDE's layout; the solvers that compute it are any ``solvers.load`` spec (the
registered ones, a user's class, an external executable, an HTTP server), as long as they speak the
family's state layout and conditions:

- ``burgers``: 1-D periodic cell averages ``(n,)``; condition ``forcing`` (a field of the state's
  shape; one smooth random forcing per simulation, fixed in time). The corrector is 1-D with
  circular padding; its inputs are u and the forcing.
- ``wake``: the staggered 2-D velocity of :mod:`solvers.wake`; condition ``re`` (one Reynolds number
  per simulation). The corrector sees both components cropped to the cells (Um et al.: the last
  face of each axis dropped) and Re as a constant plane; its output is padded back with zero
  corrections on the dropped faces.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class Family:
    """Layout, simulations and network I/O of one PDE family (see the module docstring)."""

    name = ""
    field_channels = 1
    cond_channels = 1
    dims = 1
    padding_mode = "zeros"

    def __init__(self, factor: int, source_shape: tuple[int, ...]) -> None:
        self.factor, self.source_shape = int(factor), tuple(source_shape)

    # -- simulations ---------------------------------------------------------------------------------
    def conditions(self, split: str, count: int, seed: int, fine_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Per-simulation conditions for the reference solver (train and test disjoint)."""
        raise NotImplementedError

    def initial_states(self, fine_shape: tuple[int, ...], count: int, seed: int) -> np.ndarray:
        """Reference start states of ``count`` simulations."""
        raise NotImplementedError

    def downsample(self, fine: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def coarse_conditions(self, fine: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(fine)

    def describe(self, conditions: dict[str, np.ndarray], i: int) -> str:
        return f"sim {i}"

    # -- network I/O (torch, batched along the first axis) -----------------------------------------
    def to_field(self, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cond_planes(self, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def from_field(self, corr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def net_input(self, state: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.to_field(state), planes], dim=1)


class BurgersFamily(Family):
    name = "burgers"
    padding_mode = "circular"

    def conditions(self, split, count, seed, fine_shape):
        (n,) = fine_shape
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        k = np.arange(1, 4)
        amp = rng.uniform(-0.5, 0.5, (count, 3, 1)) / k[None, :, None]
        phase = rng.uniform(0, 2 * math.pi, (count, 3, 1))
        x = (np.arange(n) + 0.5) / n
        return {"forcing": (amp * np.sin(2 * math.pi * k[None, :, None] * x[None, None] + phase)).sum(axis=1)}

    def initial_states(self, fine_shape, count, seed):
        """Smooth random starts: three low Fourier modes with random amplitudes and phases."""
        (n,) = fine_shape
        rng = np.random.default_rng([seed, 2])
        k = np.arange(1, 4)
        amp = rng.uniform(0.4, 1.2, (count, 3, 1)) / k[None, :, None]
        phase = rng.uniform(0, 2 * math.pi, (count, 3, 1))
        x = (np.arange(n) + 0.5) / n
        return (amp * np.sin(2 * math.pi * k[None, :, None] * x[None, None] + phase)).sum(axis=1)

    def downsample(self, fine):
        B, n = fine.shape
        return fine.reshape(B, n // self.factor, self.factor).mean(axis=2)

    def coarse_conditions(self, fine):
        return {"forcing": self.downsample(fine["forcing"])}

    def describe(self, conditions, i):
        return f"forcing #{i} (max |f| {np.abs(conditions['forcing'][i]).max():.2f})"

    def to_field(self, state):
        return state.unsqueeze(1)

    def cond_planes(self, conditions):
        return conditions["forcing"].unsqueeze(1)

    def from_field(self, corr):
        return corr[:, 0]


#: Um et al.'s Reynolds labels: training 97.7 … 3125, test 146.5 … 2343.8 (their ``re`` / 1638.4)
WAKE_TRAIN_RE = tuple(1e4 * 2 ** (i + 4) / 1638.4 for i in range(6))
WAKE_TEST_RE = tuple(3e4 * 2 ** (i + 3) / 1638.4 for i in range(5))


def spread(values: tuple[float, ...], count: int) -> list[float]:
    """``count`` of ``values``, evenly spread over the list (all of them when count >= len)."""
    if count >= len(values):
        return list(values)
    idx = np.round(np.linspace(0, len(values) - 1, count)).astype(int)
    return [values[i] for i in idx]


class WakeFamily(Family):
    name = "wake"
    field_channels = 2
    dims = 2

    def __init__(self, factor, source_shape, resolution: tuple[int, int] = (32, 64)):
        super().__init__(factor, source_shape)
        self.nx, self.ny = (int(r) for r in resolution)
        if (self.nx + 1) * self.ny + self.nx * (self.ny + 1) != self.source_shape[0]:
            raise ValueError(f"wake: the source state has {self.source_shape[0]} values, not the staggered "
                             f"{self.nx}×{self.ny} grid's; set solver.source_options.resolution")

    def conditions(self, split, count, seed, fine_shape):
        return {"re": np.array(spread(WAKE_TRAIN_RE if split == "train" else WAKE_TEST_RE, count))}

    def initial_states(self, fine_shape, count, seed):
        from solvers.wake import initial_velocity

        return initial_velocity(self.nx * self.factor, self.ny * self.factor, count)

    def _split(self, state, nx, ny):
        B = state.shape[0]
        nxf = (nx + 1) * ny
        return state[:, :nxf].reshape(B, nx + 1, ny), state[:, nxf:].reshape(B, nx, ny + 1)

    def downsample(self, fine):
        from solvers.wake import downsample_faces

        nx, ny = self.nx * self.factor, self.ny * self.factor
        vx, vy = downsample_faces(*self._split(fine, nx, ny), self.factor)
        return np.concatenate([vx.reshape(len(fine), -1), vy.reshape(len(fine), -1)], axis=1)

    def describe(self, conditions, i):
        return f"Re {conditions['re'][i]:.1f}"

    def to_field(self, state):
        vx, vy = self._split(state, self.nx, self.ny)
        return torch.stack([vx[:, :-1, :], vy[:, :, :-1]], dim=1)

    def cond_planes(self, conditions):
        re = conditions["re"].reshape(-1, 1, 1, 1)
        return re.expand(-1, 1, self.nx, self.ny)

    def from_field(self, corr):
        B = corr.shape[0]
        cx = torch.nn.functional.pad(corr[:, 0], (0, 0, 0, 1))          # zero correction on the last x-faces
        cy = torch.nn.functional.pad(corr[:, 1], (0, 1))                # and on the last y-faces
        return torch.cat([cx.reshape(B, -1), cy.reshape(B, -1)], dim=1)


FAMILIES = ("burgers", "wake")


def make_family(name: str, factor: int, source_shape: tuple[int, ...], source_options: dict) -> Family:
    if name == "burgers":
        if len(source_shape) != 1:
            raise ValueError(f"solver.family=burgers needs a 1-D state; the source solver's state has shape "
                             f"{source_shape}")
        return BurgersFamily(factor, source_shape)
    if name == "wake":
        return WakeFamily(factor, source_shape, tuple(source_options.get("resolution", (32, 64))))
    raise ValueError(f"unknown solver.family '{name}'; allowed: {', '.join(FAMILIES)}")
