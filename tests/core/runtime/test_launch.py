"""The ``--nproc`` launcher and multi-rank CLI runs: bad options, a rank that dies or hangs, Ctrl-C,
a stop every rank makes alike, the reaper of hung ranks, the ranks' command line.

Every multi-process test runs real subprocesses (torchrun, the real ``deepzero`` command).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, deepzero, process_env

linux_only = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")


# -- the CLI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    (["--nproc", "0"], "--nproc must be >= 1; got 0"),
    (["--nproc", "-2"], "--nproc must be >= 1; got -2"),
    (["--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
    (["--nproc", "2", "--dist-timeout", "0"], "--dist-timeout must be a number of seconds > 0"),
    (["--nproc", "2", "--set", "optim.method=zo-rge"], "optim.method=zo-rge would repeat the same work"),
    (["--nproc", "2", "--device", "cuda:1", "CUDA"], "run.device=cuda:1 names one GPU, but each of the 2 processes "
                                                     "takes its own (process i: GPU i): use --device cuda"),
    (["--nproc", "2", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=2.5"],          # the ranks' grace, from the environment
     "TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds >= 0; got '2.5'"),
])
def test_bad_nproc_is_one_line(tmp_path, monkeypatch, capsys, args, expected):
    from applications.classification.cli import main

    monkeypatch.setenv("DEEPZERO_HOME", str(tmp_path))
    for name, _, value in (a.partition("=") for a in args if a.startswith("TORCH_")):
        monkeypatch.setenv(name, value)
    if "CUDA" in args:                                    # as on a machine with GPUs
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = [a for a in args if not a.startswith("TORCH_") and a != "CUDA"]
    try:
        code = main(["train", "--preset", "smoke", *args])
    except SystemExit as exc:                             # argparse's own errors
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "mlflow").exists()             # no run was opened


# scikit-learn's 8×8 digits load in milliseconds; 6 short epochs leave time to interrupt epoch 2
ARGS = ["classify", "train", "--preset", "smoke", "--set", "data.name=digits", "--set", "data.train_subset=512",
        "--set", "optim.epochs=6", "--no-progress"]


def _rank_pid(home: Path, rank: int) -> int | None:
    """The pid of rank ``rank`` of the run whose DEEPZERO_HOME is ``home``."""
    want = {f"DEEPZERO_HOME={home}".encode(), f"RANK={rank}".encode(), f"LOCAL_RANK={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            return int(pid)
    return None


def _start(home: Path, *extra: str, env: dict[str, str] | None = None,
           new_session: bool = False) -> tuple[subprocess.Popen, list[Path]]:
    """Start a 2-rank run of ARGS + ``extra``; return it and its checkpoint once epoch 1 wrote one
    (an empty list if the run ended or 240 s passed first)."""
    child = subprocess.Popen([sys.executable, "-m", "applications", *ARGS, *extra, "--nproc", "2"], cwd=ROOT,
                             env=process_env(DEEPZERO_HOME=str(home), **(env or {})), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=new_session)
    deadline, ckpts = time.time() + 240, []
    while not ckpts and time.time() < deadline and child.poll() is None:
        ckpts = list((home / "runs" / "classify").glob("*/checkpoint.pt"))
        time.sleep(0.02)
    return child, ckpts


def _interrupt_rank(home: Path, rank: int, sig: int, *extra: str,
                    env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path, float]:
    """Start a 2-rank run, send ``sig`` to ``rank`` once epoch 1's checkpoint exists; wait for the end."""
    child, ckpts = _start(home, *extra, env=env)
    pid = _rank_pid(home, rank)
    assert ckpts and pid, (f"no checkpoint or no rank {rank}", child.poll(), child.stderr.read() if child.poll() else "")
    os.kill(pid, sig)
    sent = time.time()
    try:
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
        if sig == signal.SIGSTOP and _rank_pid(home, rank):
            os.kill(pid, signal.SIGKILL)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err), ckpts[0], time.time() - sent


def _stop_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 1, no traceback, one line saying why, then only the resume command."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 2 and lines[1].strip().startswith("DEEPZERO_HOME="), proc.stderr
    assert "--resume" in lines[1] and "--nproc 2" in lines[1]
    return lines[0]


def _uninterrupted(home: Path, monkeypatch) -> dict:
    """The same run, one process, in this process: the loop against a tracker that logs nothing."""
    from applications.classification.cli import _flag_overrides, _parser
    from applications.classification.config import PRESET_DIR, ClassifyConfig
    from applications.classification.train import ClassifyExperiment
    from core.runtime.cli import resolve_config
    from core.runtime.loop import run_experiment
    from core.runtime.tracking import NullTracker

    monkeypatch.setenv("DEEPZERO_HOME", str(home))
    args = _parser("deepzero classify").parse_args(ARGS[1:])
    torch.set_num_threads(1)
    exp = ClassifyExperiment(resolve_config(args, ClassifyConfig, PRESET_DIR, _flag_overrides(args)))
    run_experiment(exp, NullTracker(), progress=False, save_checkpoints=False)
    return {"model": exp.model.state_dict(), "history": exp.history}


@linux_only
def test_killed_rank_ends_the_run_in_one_line_and_resumes_on_one_rank(tmp_path, monkeypatch):
    from core.runtime.checkpoint import load_checkpoint

    proc, ckpt, took = _interrupt_rank(tmp_path, 1, signal.SIGKILL)
    line = _stop_line(proc)
    assert "stopped: rank 1 of 2 was killed by SIGKILL; the checkpoint of epoch 1 is kept" in line, line
    assert took < 60
    partial = load_checkpoint(ckpt, app="classify")           # intact, and only epoch 1
    assert partial["epoch"] == 1
    resumed = deepzero("classify", "train", "--resume", str(ckpt), "--no-progress", home=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    b = load_checkpoint(ckpt)
    assert b["epoch"] == 6 and b["mlflow_run_id"] == partial["mlflow_run_id"]
    a = _uninterrupted(tmp_path / "straight", monkeypatch)
    for k in a["model"]:                 # 2 ranks then 1 == 1 throughout: float32, equal within rounding
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6)   # (bit for bit today)
    torch.testing.assert_close([h["test_loss"] for h in b["history"]], [h["test_loss"] for h in a["history"]],
                               rtol=1e-4, atol=0)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(b["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["deepzero.ranks"] == "1"
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 6


@linux_only
@pytest.mark.parametrize("to", ["terminal", "launcher"])
def test_ctrl_c_interrupts_every_rank_once_and_prints_the_resume_command(tmp_path, to):
    """Ctrl-C in a terminal reaches the launcher and torchrun (one process group); ``kill -INT``
    the launcher alone, which then passes it on. Either way the ranks get one SIGINT: rank 0 says
    where it was interrupted and how to resume, and its MLflow run ends KILLED."""
    child, ckpts = _start(tmp_path, "--set", "optim.epochs=400", new_session=True)
    assert ckpts, child.communicate()[1] if child.poll() is not None else "no checkpoint"
    (os.killpg if to == "terminal" else os.kill)(child.pid, signal.SIGINT)
    try:
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert child.returncode == 130 and "Traceback" not in err and "SIGTERM" not in err, err
    assert lines[0].startswith("interrupted during epoch ") and "is kept; resume with:" in lines[0], err
    assert "--resume" in lines[1] and "--nproc 2" in lines[1], err
    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}").search_runs(["1"])
    assert run.info.status == "KILLED", run.info


def test_a_stop_every_rank_makes_is_reported_once_by_rank_0(tmp_path):
    """A diverging loss stops every rank at the same step: rank 0's own line (no resume command: it
    would diverge again), not a report of rank 1 failing, and rank 0 finishes its MLflow run."""
    proc = deepzero(*ARGS, "--set", "optim.epochs=3", "--set", "optim.lr=40", "--nproc", "2", home=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("deepzero classify train: stopped: training diverged"), lines
    assert "resuming it would diverge again" in lines[0] and "rank 1" not in lines[0], lines
    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}").search_runs(["1"]) or [None]
    assert run.info.status == "FINISHED" and run.data.tags["deepzero.stop_reason"].startswith("training diverged")


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("hung", [1, 0])
def test_hung_rank_ends_the_run_after_the_timeout_and_is_named(tmp_path, hung):
    """Rank 1 stopped: rank 0 times out and says so. Rank 0 stopped (it may hang in MLflow or
    checkpoint I/O): rank 1 times out, and the launcher's line is rank 1's."""
    from core.runtime.checkpoint import load_checkpoint

    proc, ckpt, took = _interrupt_rank(tmp_path, hung, signal.SIGSTOP, "--dist-timeout", "5",
                                       env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"})   # torchrun's grace
    line = _stop_line(proc)
    # stopped before the collective ("which never reached the ...") or inside it ("inside the ...")
    assert f"lost contact with rank {hung}" in line and "Timed out" in line, line
    if hung == 0:
        assert "stopped: rank 1 of 2 lost contact with rank 0" in line, line
    assert "the checkpoint of epoch 1 is kept" in line
    # the timeout, the other rank's close and the launcher's 3 s grace; torchrun alone waits 30 s
    assert took < 5 + 3 + 25, took
    assert load_checkpoint(ckpt, app="classify")["epoch"] == 1


@linux_only
def test_reaper_kills_only_the_ranks_torchrun_closes_and_only_its_own_children(tmp_path):
    """torchrun's "closing signal" lines name the pids; after the grace a stopped child is killed,
    a pid that is not the launcher's child (here a grandchild) is left alone."""
    from core.runtime.torchrun import Reaper

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = subprocess.Popen(sleeper)
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
                               "print(p.pid, flush=True); p.wait()", *sleeper], stdout=subprocess.PIPE, text=True)
    grandchild = int(parent.stdout.readline())
    try:
        os.kill(child.pid, signal.SIGSTOP)                      # a hung rank: SIGTERM would do nothing
        log = tmp_path / "torchrun.log"
        digits = str(grandchild).encode()
        log.write_bytes(b"W1207 api.py:1028] Sending process %d closing signal SIGTERM\n" % child.pid
                        + b"W1207 api.py:1028] Sending process " + digits[:-1])   # a line still being written
        reaper = Reaper(log, os.getpid(), grace=0.3)
        reaper.poll()
        assert set(reaper.closing) == {child.pid}                # not the pid cut short, nor a wrong one
        with open(log, "ab") as f:
            f.write(digits[-1:] + b" closing signal SIGTERM\n")
        reaper.poll()
        assert set(reaper.closing) == {child.pid, grandchild}
        assert child.poll() is None
        time.sleep(0.4)
        reaper.poll()
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert not reaper.closing
        time.sleep(0.2)
        assert _alive(grandchild)
    finally:
        for p in (child, parent):
            p.kill()
        try:
            os.kill(grandchild, signal.SIGKILL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_more_cuda_ranks_than_gpus_is_one_line(monkeypatch):
    from core.runtime.errors import UserError
    from core.runtime.ranks import start_session

    monkeypatch.setenv("RANK", "8")
    monkeypatch.setenv("WORLD_SIZE", "9")
    monkeypatch.setenv("LOCAL_RANK", "8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    args = type("Args", (), {"nproc": 1, "dist_timeout": 5.0})()
    with pytest.raises(UserError, match="this machine has 2: local rank 8 has none .start at most 2 processes"):
        start_session(args, torch.device("cuda"))


@pytest.mark.parametrize("env,device,expected", [
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, "cuda", 1),         # process i: GPU i
    ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, "cuda:1", 1),       # one process per machine: the GPU named
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, "cuda:1", "names one GPU, but each of the 2 processes on this "
                                                             "machine takes its own"),
    ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, "cuda:2", "device cuda:2: this machine has 2 GPUs"),
])
def test_each_rank_takes_its_own_gpu(monkeypatch, env, device, expected):
    from core.collectives import rank_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if isinstance(expected, int):
        assert rank_gpu(torch.device(device)) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            rank_gpu(torch.device(device))


def test_nccl_ranks_wait_blocking_so_a_timeout_is_a_python_error(monkeypatch):
    """NCCL's default only queues a collective and lets its watchdog SIGABRT a timed-out process; the
    ranks join with blocking waits (unless the user chose), so a timeout raises where RankLost is made."""
    import torch.distributed as dist

    from core import collectives as C

    joined = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: joined.append(("gpu", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: joined.append(
        (backend, os.environ.get("TORCH_NCCL_BLOCKING_WAIT"), timeout.total_seconds())))
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    assert C.init_from_env(device="cuda", timeout=30)
    assert joined == [("gpu", 1), ("nccl", "1", 30.0)]
    joined.clear()
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")                  # the user's choice stands
    C.init_from_env(device="cuda", timeout=30)
    assert joined == [("gpu", 1), ("nccl", "0", 30.0)]
    joined.clear()
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT")
    monkeypatch.setenv("NCCL_BLOCKING_WAIT", "0")                        # under its older name too
    C.init_from_env(device="cuda", timeout=30)
    assert joined == [("gpu", 1), ("nccl", None, 30.0)]
    joined.clear()
    C.init_from_env(device="cpu", timeout=30)                            # gloo: nothing to change
    assert joined == [("gloo", None, 30.0)]


def test_ranks_get_the_command_without_nproc_and_without_abbreviations():
    from applications.classification.cli import _parser
    from core.runtime.launch import rank_argv

    argv = ["train", "--npr", "3", "--no", "--set", "optim.epochs=2", "--nproc=3", "--dist", "9", "--data-r=/d"]
    args = _parser("deepzero classify").parse_args(argv)
    assert args.nproc == 3 and args.dist_timeout == 9 and args.no_progress
    # torchrun reads its own options out of the whole line: '--no' or '--nproc' would match several
    assert rank_argv(args, argv[1:]) == ["--no-progress", "--set", "optim.epochs=2", "--dist-timeout", "9",
                                         "--data-root=/d"]
