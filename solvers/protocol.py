"""The solver contract: a stateless, batched, non-differentiable step on NumPy arrays.

Convention (every adapter follows it): ``step(state, **conditions)`` takes ``state`` of shape
``(B, *state_shape)`` and dtype ``dtype`` and returns a NEW array of the same shape and dtype — the
state one time step ``dt`` later. Conditions (e.g. the Reynolds number) are arrays of shape
``(B,)`` or ``(B, ...)``. Same input, same output (deterministic). Solvers never see autograd:
passing a tensor that requires grad is an error, because these steps are black boxes by design.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class SolverError(RuntimeError):
    """Any failure of a solver: crash, timeout, NaN/Inf, wrong shape or dtype, bad input."""


@runtime_checkable
class Solver(Protocol):
    """s_{t+1} = S(s_t; conditions), batched along the first axis, without gradients."""

    state_shape: tuple[int, ...]
    dtype: np.dtype

    def step(self, state: np.ndarray, **conditions: Any) -> np.ndarray: ...

    def close(self) -> None: ...


def as_state(state: Any, state_shape: tuple[int, ...], dtype: np.dtype, who: str) -> np.ndarray:
    """Validate and convert a solver input to a C-contiguous ``(B, *state_shape)`` array."""
    if getattr(state, "requires_grad", False):
        raise SolverError(f"{who} received a tensor that requires grad: solvers are non-differentiable black "
                          "boxes; estimate gradients through them with a ZO estimator (core.CGE / core.RGE)")
    if hasattr(state, "detach"):
        state = state.detach().cpu().numpy()
    arr = np.asarray(state)
    if arr.ndim != len(state_shape) + 1 or tuple(arr.shape[1:]) != tuple(state_shape):
        raise SolverError(f"{who} expects state of shape (B, {', '.join(map(str, state_shape))}); got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def check_output(out: Any, batch: int, state_shape: tuple[int, ...], dtype: np.dtype, who: str) -> np.ndarray:
    """A solver's answer must be finite, of the input's shape and of the solver's dtype."""
    if not isinstance(out, np.ndarray):
        raise SolverError(f"{who} returned {type(out).__name__}, not a numpy array")
    if out.shape != (batch, *state_shape):
        raise SolverError(f"{who} returned shape {out.shape}; expected {(batch, *state_shape)}")
    if out.dtype != dtype:
        raise SolverError(f"{who} returned dtype {out.dtype}; expected {np.dtype(dtype)}")
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise SolverError(f"{who} returned {bad} NaN/Inf values (unstable step? try a smaller dt)")
    return out


def as_condition(key: str, value: Any, who: str) -> np.ndarray:
    """A condition as a NumPy array; autograd tensors are refused like states are."""
    if getattr(value, "requires_grad", False):
        raise SolverError(f"{who}: condition '{key}' requires grad; solvers are non-differentiable")
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class Closeable:
    """``close()`` (a no-op here) and the context-manager protocol calling it."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SolverBase(Closeable):
    """Shared plumbing for in-process solvers: validation, context manager, ``close``."""

    state_shape: tuple[int, ...] = ()
    dtype: np.dtype = np.dtype(np.float64)
    name = "solver"

    def step(self, state: Any, **conditions: Any) -> np.ndarray:
        arr = as_state(state, self.state_shape, self.dtype, self.name)
        conds = {k: self._condition(k, v, arr.shape[0]) for k, v in conditions.items()}
        return check_output(self._step(arr, **conds), arr.shape[0], self.state_shape, self.dtype, self.name)

    def _condition(self, key: str, value: Any, batch: int) -> np.ndarray:
        arr = as_condition(key, value, self.name).astype(np.float64)
        if arr.ndim == 0:
            arr = np.full(batch, float(arr))
        if arr.shape[0] != batch:
            raise SolverError(f"{self.name}: condition '{key}' has {arr.shape[0]} entries for a batch of {batch}")
        return arr

    def _step(self, state: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def initial_state(self, batch: int, seed: int = 0) -> np.ndarray:
        """A valid state to start from (used by ``deepzero solver check``)."""
        return np.zeros((batch, *self.state_shape), dtype=self.dtype)
