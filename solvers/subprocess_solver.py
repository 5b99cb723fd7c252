"""``SubprocessSolver``: a user's solver program kept alive behind the wire format (:mod:`solvers.wire`).

The program is started once (never through a shell), in its own process group, and exchanges
frames on stdin/stdout; its stderr is collected so every error can show the tail of it. Each call
has a deadline: a crash, a hang past the timeout, an error frame, NaN/Inf, or a wrong shape or
dtype raises :class:`SolverError` with the cause. After a crash or timeout the program is killed
(with its whole process group); ``close()`` ends it cleanly, and a finalizer kills it if the solver
object is dropped or the interpreter exits, so no child outlives its solver.
"""
from __future__ import annotations

import collections
import os
import select
import signal
import subprocess
import threading
import time
import weakref
from typing import Any

import numpy as np

from solvers import wire
from solvers.protocol import Closeable, SolverError, as_condition, as_state, check_output


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            stream and stream.close()
        except OSError:
            pass


def _drain(stream, lines: collections.deque) -> None:
    try:
        for line in iter(stream.readline, b""):
            lines.append(line.decode(errors="replace").rstrip())
    except (OSError, ValueError):
        pass


class _Reader:
    """Frames from a pipe with a deadline (select + os.read into a buffer)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, bytearray()

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(self.fd, max(65536, n - len(self.buf)))
            if not chunk:
                raise EOFError
            self.buf += chunk

    def frame(self, deadline: float) -> tuple[str, Any]:
        self._fill(9, deadline)
        length = int.from_bytes(self.buf[1:9], "little")
        if length > wire.MAX_FRAME:
            raise wire.WireError(f"frame of {length} bytes is too large")
        self._fill(9 + length, deadline)
        raw, self.buf = bytes(self.buf[:9 + length]), self.buf[9 + length:]
        import io

        return wire.read_frame(io.BytesIO(raw))


class SubprocessSolver(Closeable):
    """An external solver program speaking the deepzero wire format.

    Args:
        cmd: the program and its arguments, e.g. ``["python", "-m", "solvers.example_server"]``.
        timeout: seconds allowed for the handshake and for each step.
        env, cwd: passed to the program.
    """

    def __init__(self, cmd: list[str], timeout: float = 60.0, *, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self._start(cmd, timeout, env=env, cwd=cwd, role="solver program")
        self.name = os.path.basename(self.cmd[0])
        kind, hello = self._receive("handshake")
        if kind != "J" or hello.get("protocol") != wire.PROTOCOL:
            self._fail(f"bad handshake (expected protocol {wire.PROTOCOL}); got {str(hello)[:120]}")
        try:
            self.state_shape = tuple(int(s) for s in hello["state_shape"])
            self.dtype = np.dtype(hello["dtype"])
        except (KeyError, TypeError, ValueError):
            self._fail(f"handshake lacks a valid state_shape/dtype: {str(hello)[:120]}")
        self.conditions = tuple(hello.get("conditions", ()))

    def _start(self, cmd: list[str], timeout: float, *, env: dict[str, str] | None, cwd: str | None,
               role: str) -> None:
        """Start the program in its own process group, with a stderr drain and a killing finalizer."""
        if isinstance(cmd, str) or not cmd:
            raise SolverError("cmd must be a non-empty list of arguments (it is never run through a shell)")
        if not timeout > 0:
            raise SolverError(f"timeout must be > 0; got {timeout}")
        self.cmd, self.timeout = [str(c) for c in cmd], float(timeout)
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._dead: str | None = None
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, env=env, cwd=cwd,
                                         start_new_session=True)
        except OSError as exc:
            raise SolverError(f"cannot start {role} {self.cmd[0]!r}: {exc.strerror or exc}") from None
        self._finalizer = weakref.finalize(self, _kill_group, self.proc)
        # the drain thread must not hold ``self``, or the finalizer would never run on drop
        self._err_thread = threading.Thread(target=_drain, args=(self.proc.stderr, self._stderr), daemon=True)
        self._err_thread.start()
        self._reader = _Reader(self.proc.stdout.fileno())

    # -- plumbing ----------------------------------------------------------------------------
    def stderr_tail(self, lines: int = 10) -> str:
        time.sleep(0.05)   # let the drain thread catch the last lines of a dying program
        tail = list(self._stderr)[-lines:]
        return (" | stderr: " + " / ".join(tail)) if tail else ""

    def _fail(self, why: str, kill: bool = True):
        if kill:
            _kill_group(self.proc)
            self._dead = why
        raise SolverError(f"solver program {self.name}: {why}{self.stderr_tail()}")

    def _receive(self, what: str):
        try:
            return self._reader.frame(time.monotonic() + self.timeout)
        except TimeoutError:
            self._fail(f"no answer to {what} within {self.timeout:g}s (hung?); killed it")
        except (EOFError, OSError):
            try:
                rc = self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                rc = None
            self._fail(f"exited (status {rc}) during {what}")
        except wire.WireError as exc:
            self._fail(f"sent a malformed frame during {what}: {exc}")

    def _send(self, frames: list[tuple[str, Any]]) -> None:
        import io

        buf = io.BytesIO()
        for kind, obj in frames:
            (wire.write_json if kind == "J" else wire.write_array)(buf, obj)
        data, error = buf.getvalue(), []

        def push():
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except OSError as exc:
                error.append(exc)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        t.join(self.timeout)
        if t.is_alive():
            self._fail(f"did not read its input within {self.timeout:g}s (hung?); killed it")
        if error:
            self._fail(f"closed its input ({error[0]}); status {self.proc.poll()}")

    # -- Solver ------------------------------------------------------------------------------
    def step(self, state: Any, **conditions: Any) -> np.ndarray:
        if self._dead:
            raise SolverError(f"solver program {self.name} is no longer running ({self._dead})")
        arr = as_state(state, self.state_shape, self.dtype, self.name)
        frames: list[tuple[str, Any]] = [("J", {"op": "step", "conditions": list(conditions)}), ("N", arr)]
        frames += [("N", as_condition(k, v, self.name)) for k, v in conditions.items()]
        self._send(frames)
        kind, out = self._receive("a step")
        if kind == "J":
            raise SolverError(f"solver program {self.name} reported: {out.get('error', out)}")
        return check_output(out, arr.shape[0], self.state_shape, self.dtype, self.name)

    def close(self) -> None:
        if self.proc.poll() is None and not self._dead:
            try:
                self.proc.stdin.write(b"J" + (len(b'{"op": "close"}')).to_bytes(8, "little") + b'{"op": "close"}')
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._dead = self._dead or "closed"
        self._finalizer()
