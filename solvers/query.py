"""Query programs: an array-in, array-out black box whose output shape differs from its input's.

A solver's ``step`` maps a state to a state of the same shape; a *query* maps a batch
``x`` of shape ``(B, *input_shape)`` to ``y`` of shape ``(B, *output_shape)`` — a classifier
(images in, logits or labels out) is one. This module carries such a callable over the same two
transports as the solvers, reusing their machinery:

- an external program on stdin/stdout (:class:`SubprocessQuery`, a :class:`SubprocessSolver`
  with another handshake and request: same process group, deadlines, stderr tail and cleanup);
- loopback HTTP in the spirit of UM-Bridge (:mod:`solvers.http_query`).

Wire session (frames of :mod:`solvers.wire`):

1. The program sends ``J {"protocol": "deepzero-query/1", "input_shape": [...], "input_dtype": "<f4",
   "output_shape": [...], "output_dtype": "<f4", ...}``; further keys are free for the caller's own
   convention (a classifier adds ``"output": "logits" | "labels"`` and ``"num_classes"``).
2. Per query deepzero sends ``J {"op": "query"}`` then ``N x``; the program answers ``N y`` or
   ``J {"error": "message"}``.
3. ``J {"op": "close"}`` asks the program to exit (status 0).

Every failure on the client side is a :class:`SolverError`.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from solvers import wire
from solvers.protocol import SolverError
from solvers.subprocess_solver import SubprocessSolver, _kill_group

PROTOCOL = "deepzero-query/1"


@dataclass(frozen=True)
class QuerySpec:
    """The shapes and dtypes of one query: ``(B, *input_shape)`` → ``(B, *output_shape)``.

    ``info`` holds the handshake's other keys (the caller's own convention), as plain JSON data.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_dtype: np.dtype = np.dtype(np.float32)
    output_dtype: np.dtype = np.dtype(np.float32)
    info: dict[str, Any] = field(default_factory=dict)

    def handshake(self) -> dict[str, Any]:
        return {**self.info, "protocol": PROTOCOL, "input_shape": list(self.input_shape),
                "input_dtype": np.dtype(self.input_dtype).str, "output_shape": list(self.output_shape),
                "output_dtype": np.dtype(self.output_dtype).str}

    @classmethod
    def from_handshake(cls, hello: Any, who: str) -> QuerySpec:
        """Parse a handshake; :class:`SolverError` naming ``who`` if it is not a valid one."""
        try:
            return cls._parse(hello)
        except ValueError as exc:
            raise SolverError(f"{who}: {exc}") from None

    @classmethod
    def _parse(cls, hello: Any) -> QuerySpec:
        if not isinstance(hello, dict) or hello.get("protocol") != PROTOCOL:
            raise ValueError(f"bad handshake (expected protocol {PROTOCOL}); got {str(hello)[:120]}")
        try:
            spec = cls(tuple(int(s) for s in hello["input_shape"]),
                       tuple(int(s) for s in hello["output_shape"]),
                       np.dtype(hello.get("input_dtype", "<f4")), np.dtype(hello.get("output_dtype", "<f4")),
                       {k: v for k, v in hello.items() if k not in _HANDSHAKE_KEYS})
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"handshake lacks a valid input_shape/output_shape/dtype: "
                             f"{str(hello)[:160]}") from None
        if min(spec.input_shape + spec.output_shape, default=1) < 1:
            raise ValueError(f"handshake declares an empty shape: {str(hello)[:160]}")
        return spec

    def check_input(self, x: Any, who: str) -> np.ndarray:
        """``x`` as a C-contiguous ``(B, *input_shape)`` array of ``input_dtype``."""
        if getattr(x, "requires_grad", False):
            raise SolverError(f"{who} received a tensor that requires grad: a query program is a "
                              "non-differentiable black box; estimate gradients with a ZO estimator")
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        arr = np.asarray(x)
        if arr.ndim != len(self.input_shape) + 1 or tuple(arr.shape[1:]) != self.input_shape:
            raise SolverError(f"{who} expects input of shape (B, {', '.join(map(str, self.input_shape))}); "
                              f"got {arr.shape}")
        return np.ascontiguousarray(arr, dtype=self.input_dtype)

    def check_output(self, y: Any, batch: int, who: str) -> np.ndarray:
        """The answer must be a finite ``(batch, *output_shape)`` array of ``output_dtype``."""
        if not isinstance(y, np.ndarray):
            raise SolverError(f"{who} returned {type(y).__name__}, not a numpy array")
        if y.shape != (batch, *self.output_shape):
            raise SolverError(f"{who} returned shape {y.shape}; expected {(batch, *self.output_shape)}")
        if y.dtype != self.output_dtype:
            raise SolverError(f"{who} returned dtype {y.dtype}; expected {np.dtype(self.output_dtype)}")
        if y.dtype.kind in "fc" and not np.isfinite(y).all():
            raise SolverError(f"{who} returned {int((~np.isfinite(y)).sum())} NaN/Inf values")
        return y


_HANDSHAKE_KEYS = ("protocol", "input_shape", "input_dtype", "output_shape", "output_dtype")


def serve_query(fn: Callable[[np.ndarray], np.ndarray], spec: QuerySpec, stdin: BinaryIO,
                stdout: BinaryIO) -> int:
    """Run the program side of the wire session for ``fn`` until close/EOF; returns the exit status.

    ``fn`` receives a checked ``(B, *input_shape)`` array; its answer is sent as it is (the
    client checks its shape, dtype and finiteness). An exception in ``fn`` becomes an error frame
    and the program keeps serving.
    """
    wire.write_json(stdout, spec.handshake())
    stdout.flush()
    while True:
        try:
            kind, msg = wire.read_frame(stdin)
        except wire.WireError:
            return 0                                   # deepzero went away: exit quietly
        if kind != "J" or msg.get("op") not in ("query", "close"):
            wire.write_json(stdout, {"error": f"expected a query or close request, got {kind} {msg!r:.80}"})
            stdout.flush()
            continue
        if msg["op"] == "close":
            return 0
        try:
            _, x = wire.read_frame(stdin)
            wire.write_array(stdout, np.asarray(fn(spec.check_input(x, "query program"))))
        except wire.WireError:
            return 0
        except Exception as exc:                        # report, keep serving
            wire.write_json(stdout, {"error": f"{type(exc).__name__}: {exc}"})
        stdout.flush()


class SubprocessQuery(SubprocessSolver):
    """An external query program speaking :data:`PROTOCOL`, started once and kept alive.

    Everything but the handshake and the request is :class:`SubprocessSolver`'s: no shell, its own
    process group, a deadline on every exchange, the stderr tail in every error, and the whole
    group killed on a crash, a timeout, ``close()`` or when the object is dropped.

    Args:
        cmd: the program and its arguments (a list; never run through a shell).
        timeout: seconds allowed for the handshake and for each query.
        env, cwd: passed to the program.
        role: how errors name the program (e.g. ``"classifier program"``).
    """

    def __init__(self, cmd: list[str], timeout: float = 60.0, *, env: dict[str, str] | None = None,
                 cwd: str | None = None, role: str = "query program") -> None:
        self.role = role
        self._start(cmd, timeout, env=env, cwd=cwd, role=role)
        name = shlex.join([os.path.basename(self.cmd[0]), *self.cmd[1:]])
        self.name = name if len(name) <= 80 else name[:77] + "..."
        kind, hello = self._receive("handshake")
        try:
            self.spec = QuerySpec._parse(hello if kind == "J" else None)
        except ValueError as exc:
            self._fail(str(exc))
        self.state_shape, self.dtype, self.conditions = self.spec.input_shape, self.spec.input_dtype, ()

    def _fail(self, why: str, kill: bool = True):
        if kill:
            _kill_group(self.proc)
            self._dead = why
        raise SolverError(f"{self.role} {self.name}: {why}{self.stderr_tail()}")

    def query(self, x: Any) -> np.ndarray:
        """``(B, *input_shape)`` → ``(B, *output_shape)``, checked."""
        if self._dead:
            raise SolverError(f"{self.role} {self.name} is no longer running ({self._dead})")
        arr = self.spec.check_input(x, f"{self.role} {self.name}")
        self._send([("J", {"op": "query"}), ("N", arr)])
        kind, out = self._receive("a query")
        if kind == "J":
            raise SolverError(f"{self.role} {self.name} reported: {out.get('error', out)}"
                              f"{self.stderr_tail()}")
        try:
            return self.spec.check_output(out, arr.shape[0], f"{self.role} {self.name}")
        except SolverError as exc:
            raise SolverError(f"{exc}{self.stderr_tail()}") from None

    def step(self, state: Any, **conditions: Any) -> np.ndarray:
        raise SolverError(f"{self.role} {self.name} answers queries, not solver steps: call query()")
