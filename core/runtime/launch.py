"""One training run on several processes: the ``--nproc`` flags and the launcher.

``deepzero <app> train --nproc N`` resolves the config (every mistake is one line before anything
starts), then runs ``python -m torch.distributed.run`` as a subprocess on 127.0.0.1 with the
same command less ``--nproc``: each of the N ranks sees torchrun's environment (``RANK``,
``WORLD_SIZE``, ...) and runs the training verb as a rank (:mod:`core.runtime.ranks`). Several
machines: start torchrun yourself on each (README); the ranks behave the same.

Rank 0 alone talks to MLflow, prints and writes checkpoints; the other ranks print only a stop
line. The launcher shows rank 0's output as it comes; torchrun's own report and the other ranks'
output go to a temporary folder. When a rank dies, hangs past ``--dist-timeout`` or fails, every rank ends
(torchrun stops the rest; a rank waiting on a dead or hung peer raises
:class:`core.collectives.RankLost` and stops cleanly) and the launcher prints one line saying
which rank stopped and why, that the last checkpoint is kept, and how to resume (on any number
of ranks: a checkpoint holds nothing rank-specific).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.runtime.errors import UserError

UNSHARDED = ("zo-rge", "zo-mezo", "fo")          # methods with no coordinates to split


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (default 1); each estimates a share of the CGE coordinates "
                        "(torchrun, gloo on CPU, NCCL on GPU); a checkpoint resumes on any number")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="with several processes: how long a rank waits for the others before the run stops, "
                        "checkpoint kept (default 300)")
    p.set_defaults(launch_parser=p)


def rank_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The verb's arguments for the ranks: ``--nproc`` dropped, abbreviated options spelt out.

    torchrun parses its own options out of the whole command line, so an abbreviation such as
    ``--nproc`` or ``--no`` that matches several of its options would stop it.
    """
    parser = getattr(args, "launch_parser", None)
    known = list(getattr(parser, "_option_string_actions", {}))
    out, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--":
            out += argv[i:]
            break
        key, eq, value = tok.partition("=")
        if tok.startswith("--") and key not in known:
            full = [k for k in known if k.startswith(key)]
            key = full[0] if len(full) == 1 else key
        if key == "--nproc":
            skip = not eq
            continue
        out.append(key + eq + value)
    return out


def check_launch_args(args: argparse.Namespace) -> None:
    nproc, timeout = getattr(args, "nproc", 1), getattr(args, "dist_timeout", 300.0)
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1; got {nproc}")
    if not 0 < timeout < 1e7:
        raise UserError(f"--dist-timeout must be a number of seconds > 0; got {timeout}")


def wants_launch(args: argparse.Namespace) -> bool:
    """``--nproc N > 1`` in an ordinary process: this process launches the ranks."""
    from core.collectives import torchrun_world_size

    return getattr(args, "nproc", 1) > 1 and torchrun_world_size() == 1 and "RANK" not in os.environ


def refuse_unsharded(cfg: Any, ranks: int) -> None:
    method = getattr(getattr(cfg, "optim", None), "method", None)
    if method in UNSHARDED:
        raise UserError(f"{ranks} processes split CGE's coordinates; optim.method={method} would repeat the same "
                        "work on every rank: use optim.method=zo-cge, or one process")


# -- the launcher -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback() -> str | None:
    """The loopback interface's name, for ``GLOO_SOCKET_IFNAME`` (gloo then binds 127.0.0.1)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


class _Relay:
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


def _failures(report: str) -> list[tuple[int, int]]:
    """(rank, exit code) of each failed rank in torchrun's report, the root cause first."""
    found = [(int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", report)]
    root = report.find("Root Cause")
    if root >= 0:
        first = re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", report[root:])[:1]
        found = [(int(r), int(c)) for r, c in first] + found
    return found


def _cause(failures: list[tuple[int, int]]) -> tuple[int, int] | None:
    """torchrun's root cause (first observed failure), unless that rank only got torchrun's SIGTERM
    or SIGINT (then the first failure that did not).

    A hung rank is killed only after the rank that gave up waiting for it has failed, so the root
    cause is already the rank whose line names it.
    """
    for r, code in failures:
        if -code not in (signal.SIGTERM, signal.SIGINT):
            return r, code
    return failures[0] if failures else None


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _resume_hint(ckpt: Path | None, prog: str, nproc: int) -> str:
    from core.runtime.checkpoint import load_checkpoint

    if ckpt is None or not ckpt.is_file():
        return "no epoch had finished, so there is no checkpoint to resume"
    try:
        epoch = load_checkpoint(ckpt)["epoch"]
    except UserError:
        return f"the checkpoint {ckpt} is unreadable"
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("DEEPZERO_HOME", "MLFLOW_TRACKING_URI")
                   if os.environ.get(k))
    return (f"the checkpoint of epoch {epoch} is kept; resume with:\n  {env + ' ' if env else ''}{prog} --resume "
            f"{shlex.quote(str(ckpt))} --nproc {nproc}")


def _grace() -> float:
    """Seconds a rank gets to end after torchrun told it to (SIGTERM), before SIGKILL: torch's
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` when set, else 20."""
    value = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "20")
    if not re.fullmatch(r"[0-9]+", value):
        raise UserError(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds >= 0; got {value!r}")
    return float(value)


class _Reaper:
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


def _got_it_too(proc: subprocess.Popen, reaper: _Reaper, wait: float = 2.0) -> bool:
    """Whether torchrun received this SIGINT itself (within ``wait`` seconds) or has ended.

    A Ctrl-C in a terminal reaches the whole foreground process group, torchrun included; a second
    SIGINT from the launcher would cut torchrun's shutdown short and end the ranks with SIGTERM
    instead. So the launcher forwards only a SIGINT that was sent to it alone (``kill -INT``).
    """
    deadline = time.monotonic() + wait
    while not reaper.signalled and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return reaper.signalled or proc.poll() is not None


def launch_local(args: argparse.Namespace, argv: list[str], *, prog: str, checkpoint_of) -> int:
    """Run this training command on ``args.nproc`` ranks under torchrun; report the outcome.

    Args:
        argv: the verb's own arguments (passed on less ``--nproc``, see :func:`rank_argv`).
        prog: ``"deepzero <app> <verb>"``; the ranks run ``python -m applications <app> <verb> argv``.
        checkpoint_of: ``run_id -> Path`` of that run's checkpoint (for the resume hint).
    Returns:
        0; else the exit status of the rank that ended the run (1 when it was killed).
    """
    nproc, grace = args.nproc, _grace()
    folder = Path(tempfile.mkdtemp(prefix="deepzero-ranks-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
           "--log-dir", str(folder), "--redirects", "3", "--shutdown-timeout", str(int(grace)),
           "-m", "applications", *prog.split()[1:], *rank_argv(args, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": str(getattr(args, "threads", 1)), "PYTHONUNBUFFERED": "1"}
    if env.get("LOGLEVEL", "WARNING").upper() not in ("DEBUG", "INFO", "WARNING"):
        env["LOGLEVEL"] = "WARNING"                 # torchrun's "closing signal" lines, which _Reaper reads
    if loopback() and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback()     # gloo's connections stay on 127.0.0.1
    relay = _Relay(folder, (f"{prog}:", "interrupted during"))
    done = threading.Event()

    def pump():
        reaping = True
        while not done.wait(0.1):
            relay.poll()
            if reaping:
                try:
                    reaper.poll()
                except Exception:                   # never let it stop rank 0's output; torchrun's wait applies
                    reaping = False

    interrupted = False
    with open(folder / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        reaper = _Reaper(folder / "torchrun.log", proc.pid, grace)
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        try:
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:
                    interrupted = True
                    try:
                        if not _got_it_too(proc, reaper):
                            proc.send_signal(signal.SIGINT)
                    except KeyboardInterrupt:        # pressed again meanwhile: keep waiting for torchrun
                        pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            done.set()
            thread.join()
    held = relay.finish()
    try:
        if rc == 0 or interrupted:
            sys.stderr.write(held)
            return 130 if interrupted else 0
        cause = _cause(_failures((folder / "torchrun.log").read_text(errors="replace")))
        if cause is None or (cause[0] == 0 and cause[1] >= 0):
            if not held:
                folder = None                       # keep torchrun's report: nothing else explains it
                print(f"{prog}: error: the {nproc} ranks failed (torchrun exit status {rc}); torchrun's report: "
                      f"{relay.folder / 'torchrun.log'}", file=sys.stderr)
            sys.stderr.write(held)
            return cause[1] if cause and cause[1] > 0 else 1
        r, code = cause
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            why = _last_line(next(iter(sorted(relay.folder.glob(f"*/attempt_*/{r}/stderr.log"))), Path("/nonexistent")))
            lost = re.search(r": stopped: (lost contact .*)$", why)      # it gave up waiting for another rank
            how = lost.group(1) if lost else f"failed (exit status {code})" + (f": {why}" if why else "")
        run = re.search(r"^run ([0-9a-f]{32})\b", relay.stdout_text, re.M)
        ckpt = checkpoint_of(run.group(1)) if run else None
        print(f"{prog}: stopped: rank {r} of {nproc} {how}; {_resume_hint(ckpt, prog, nproc)}", file=sys.stderr)
        return code if code > 0 else 1
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
