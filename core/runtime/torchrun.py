"""Reading and steering a running torchrun: what the launcher (:mod:`core.runtime.launch`) needs.

torchrun writes each rank's output to files under ``--log-dir`` and its own report to its stdout;
:class:`Relay` shows rank 0's files as they grow, :func:`failures` and :func:`root_cause` read which
rank ended the run from the report, and :class:`Reaper` kills a hung rank after the grace period
(:func:`shutdown_grace`), which torchrun itself stretches to 30 s when a rank fails.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.runtime.errors import UserError


class Relay:
    """Copies rank 0's growing log files to this process's stdout/stderr as they grow.

    Rank 0's closing message (a line starting with one of ``hold``) and what follows it are kept
    back: the launcher decides at the end whether that message or its own explains the stop.
    """

    def __init__(self, folder: Path, hold: tuple[str, ...]) -> None:
        self.folder, self.hold = folder, hold
        self.offsets = {"stdout": 0, "stderr": 0}
        self.pending, self.held, self.holding = "", [], False
        self.stdout_text = ""

    def poll(self) -> None:
        for name in ("stdout", "stderr"):
            files = sorted(self.folder.glob(f"*/attempt_*/0/{name}.log"))
            if not files:
                continue
            with open(files[-1], "rb") as f:
                f.seek(self.offsets[name])
                data = f.read()
            self.offsets[name] += len(data)
            text = data.decode("utf-8", errors="replace")      # a split character shows as one �, no more
            if name == "stdout":
                self.stdout_text += text
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                self._stderr(text)

    def _stderr(self, text: str) -> None:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._emit(line + "\n")
        s = self.pending.lstrip("\r\n")
        if self.pending and not self.holding and not any(s.startswith(m) or m.startswith(s) for m in self.hold):
            self._emit(self.pending)                        # a progress bar redrawn with \r
            self.pending = ""

    def _emit(self, text: str) -> None:
        if self.holding or text.lstrip("\r\n").startswith(self.hold):
            self.holding = True
            self.held.append(text)
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    def finish(self) -> str:
        self.poll()
        if self.pending:
            self._emit(self.pending)
        return "".join(self.held)


def failures(report: str) -> list[tuple[int, int]]:
    """(rank, exit code) of each failed rank in torchrun's report, the root cause first."""
    found = [(int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", report)]
    root = report.find("Root Cause")
    if root >= 0:
        first = re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", report[root:])[:1]
        found = [(int(r), int(c)) for r, c in first] + found
    return found


def root_cause(found: list[tuple[int, int]]) -> tuple[int, int] | None:
    """torchrun's root cause (first observed failure), unless that rank only got torchrun's SIGTERM
    or SIGINT (then the first failure that did not).

    A hung rank is killed only after the rank that gave up waiting for it has failed, so the root
    cause is already the rank whose line names it.
    """
    for r, code in found:
        if -code not in (signal.SIGTERM, signal.SIGINT):
            return r, code
    return found[0] if found else None


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def shutdown_grace() -> float:
    """Seconds a rank gets to end after torchrun told it to (SIGTERM), before SIGKILL: torch's
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` when set, else 20."""
    value = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "20")
    if not re.fullmatch(r"[0-9]+", value):
        raise UserError(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds >= 0; got {value!r}")
    return float(value)


class Reaper:
    """Kills, ``grace`` seconds after torchrun sent them SIGTERM, the ranks still running.

    torchrun stops the other ranks when one fails, but waits a fixed 30 s for a hung rank (one that
    cannot act on SIGTERM) whatever its ``--shutdown-timeout``. This reads torchrun's log (its
    warnings: the launcher keeps ``LOGLEVEL`` at WARNING or below) for the pids it is closing and
    sends SIGKILL itself, only to a process that is still torchrun's child (Linux's ``/proc``;
    elsewhere, or with torchrun started by hand, torchrun's own 30 s apply).
    """

    def __init__(self, log: Path, torchrun: int, grace: float) -> None:
        self.log, self.torchrun, self.grace = log, torchrun, grace
        self.offset, self.closing = 0, {}                  # pid -> when torchrun sent SIGTERM
        self.signalled = False                              # torchrun logged a SIGINT/SIGTERM of its own

    def poll(self) -> None:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1                         # whole lines only
        self.offset += cut
        now = time.monotonic()
        self.signalled = self.signalled or b" death signal, shutting down workers" in data[:cut]
        for pid in re.findall(rb"Sending process (\d+) closing signal", data[:cut]):
            self.closing.setdefault(int(pid), now)
        for pid, since in list(self.closing.items()):
            if now - since >= self.grace:
                del self.closing[pid]
                if self._parent(pid) == self.torchrun:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass

    @staticmethod
    def _parent(pid: int) -> int | None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return int(stat[stat.rfind(")") + 2:].split()[1])  # the fields after the command name: state, ppid


def got_it_too(proc: subprocess.Popen, reaper: Reaper, wait: float = 2.0) -> bool:
    """Whether torchrun received this SIGINT itself (within ``wait`` seconds) or has ended.

    A Ctrl-C in a terminal reaches the whole foreground process group, torchrun included; a second
    SIGINT from the launcher would cut torchrun's shutdown short and end the ranks with SIGTERM
    instead. So the launcher forwards only a SIGINT that was sent to it alone (``kill -INT``).
    """
    deadline = time.monotonic() + wait
    while not reaper.signalled and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return reaper.signalled or proc.poll() is not None
