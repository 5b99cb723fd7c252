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
from pathlib import Path
from typing import Any

from core.runtime.errors import UserError
from core.runtime.torchrun import Reaper, Relay, failures, got_it_too, last_line, root_cause, shutdown_grace

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


def refuse_one_gpu(cfg: Any, ranks: int) -> None:
    """``run.device=cuda:N`` names one GPU, which the ranks on this machine cannot share (each takes
    its own: :func:`core.collectives.rank_gpu`); refused before torchrun starts."""
    device = str(getattr(getattr(cfg, "run", None), "device", "")).strip()
    if re.fullmatch(r"cuda:\d+", device):
        raise UserError(f"run.device={device} names one GPU, but each of the {ranks} processes takes its own "
                        f"(process i: GPU i): use --device cuda")


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


def launch_local(args: argparse.Namespace, argv: list[str], *, prog: str, checkpoint_of) -> int:
    """Run this training command on ``args.nproc`` ranks under torchrun; report the outcome.

    Args:
        argv: the verb's own arguments (passed on less ``--nproc``, see :func:`rank_argv`).
        prog: ``"deepzero <app> <verb>"``; the ranks run ``python -m applications <app> <verb> argv``.
        checkpoint_of: ``run_id -> Path`` of that run's checkpoint (for the resume hint).
    Returns:
        0; else the exit status of the rank that ended the run (1 when it was killed).
    """
    nproc, grace = args.nproc, shutdown_grace()
    folder = Path(tempfile.mkdtemp(prefix="deepzero-ranks-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
           "--log-dir", str(folder), "--redirects", "3", "--shutdown-timeout", str(int(grace)),
           "-m", "applications", *prog.split()[1:], *rank_argv(args, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": str(getattr(args, "threads", 1)), "PYTHONUNBUFFERED": "1"}
    if env.get("LOGLEVEL", "WARNING").upper() not in ("DEBUG", "INFO", "WARNING"):
        env["LOGLEVEL"] = "WARNING"                 # torchrun's "closing signal" lines, which Reaper reads
    if loopback() and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback()     # gloo's connections stay on 127.0.0.1
    relay = Relay(folder, (f"{prog}:", "interrupted during"))
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
        reaper = Reaper(folder / "torchrun.log", proc.pid, grace)
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
                        if not got_it_too(proc, reaper):
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
        cause = root_cause(failures((folder / "torchrun.log").read_text(errors="replace")))
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
            why = last_line(next(iter(sorted(relay.folder.glob(f"*/attempt_*/{r}/stderr.log"))), Path("/nonexistent")))
            lost = re.search(r": stopped: (lost contact .*)$", why)      # it gave up waiting for another rank
            how = lost.group(1) if lost else f"failed (exit status {code})" + (f": {why}" if why else "")
        run = re.search(r"^run ([0-9a-f]{32})\b", relay.stdout_text, re.M)
        ckpt = checkpoint_of(run.group(1)) if run else None
        print(f"{prog}: stopped: rank {r} of {nproc} {how}; {_resume_hint(ckpt, prog, nproc)}", file=sys.stderr)
        return code if code > 0 else 1
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
