"""Distributed CGE: 2 gloo ranks on 127.0.0.1 against 1 process, and a rank that dies or hangs.

Every multi-process test runs real subprocesses (torchrun, the real ``deepzero`` command).
"""
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from core.distributed import split
from core.runtime.launch import loopback
from tests.helpers import ROOT, deepzero

PROGRAM = ROOT / "tests" / "core" / "programs" / "dist_cge.py"
linux_only = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


# -- splitting --------------------------------------------------------------------------------------
def test_split_keeps_parameters_whole_and_balances_their_cost():
    active = [torch.arange(10), torch.tensor([3, 5, 7]), torch.arange(0), torch.arange(100, 140), torch.arange(6)]
    costs = [4.0, 1.0, 9.0, 0.5, 2.0]                     # totals 40, 3, 0, 20, 12
    shares = split(active, 2, costs)
    for i, idx in enumerate(active):                      # each parameter on exactly one rank, whole
        assert sorted(len(shares[r][i]) for r in range(2)) == [0, len(idx)]
        assert all(torch.equal(shares[r][i], idx) for r in range(2) if len(shares[r][i]))
    load = [sum(len(s[i]) * costs[i] for i in range(5)) for s in shares]
    assert sorted(load) == [35, 40]                       # largest first, to the least loaded: {40}, {20, 12, 3}


def test_split_inside_parameters_is_a_contiguous_partition_of_equal_cost():
    active = [torch.arange(10), torch.tensor([3, 5, 7]), torch.arange(0), torch.arange(100, 140)]
    costs = [4.0, 1.0, 9.0, 0.5]                          # total 40 + 3 + 0 + 20 = 63
    shares = split(active, 3, costs, whole=False)
    for i, idx in enumerate(active):                      # rank order = coordinate order: a partition
        assert torch.equal(torch.cat([shares[r][i] for r in range(3)]), idx)
    load = [sum(len(s[i]) * costs[i] for i in range(4)) for s in shares]
    assert max(load) - min(load) <= 2 * max(costs), load  # within one coordinate's cost on each side
    even = split(active, 2, whole=False)                  # no costs: equal counts
    assert [sum(len(t) for t in s) for s in even] == [26, 27]
    again = split(active, 3, costs, whole=False)          # deterministic: every rank computes the same
    assert all(torch.equal(a, b) for s, t in zip(again, shares) for a, b in zip(s, t))


def test_split_at_batch_boundaries_cuts_only_after_whole_batches():
    active = [torch.arange(10), torch.tensor([3, 5, 7]), torch.arange(0), torch.arange(100, 140), torch.arange(6)]
    costs = [4.0, 1.0, 9.0, 0.5, 2.0]                     # totals 40, 3, 0, 20, 12: whole gives 35 / 40
    units = [4, 2, 1, 7, 100]
    for world in (2, 3):
        shares = split(active, world, costs, units=units)
        for i, idx in enumerate(active):                  # a partition, in rank order, cut after whole batches
            assert torch.equal(torch.cat([shares[r][i] for r in range(world)]), idx)
            cuts = [sum(len(shares[q][i]) for q in range(r + 1)) for r in range(world - 1)]
            assert all(c % units[i] == 0 or c == len(idx) for c in cuts), (i, cuts)
        load = [sum(len(s[i]) * costs[i] for i in range(5)) for s in shares]
        assert max(load) - min(load) <= 16 + 1e-9, load   # within one batch (4 · 4.0) of each other
    two = split(active, 3, costs, units=units)
    assert [len(s[0]) for s in two] == [8, 2, 0]          # parameter 0 cut after two batches of 4
    ones = split(active, 3, costs, units=[1] * 5)         # batches of one: the free cut
    free = split(active, 3, costs, whole=False)
    assert all(torch.equal(a, b) for s, t in zip(ones, free) for a, b in zip(s, t))
    # batches as large as the parameters: whole parameters balance better than runs in order
    three = [torch.arange(3), torch.arange(6), torch.arange(3)]
    assert sorted(sum(len(t) for t in s) for s in split(three, 2, units=[100] * 3)) == [6, 6]


# -- 2 ranks == 1 process ----------------------------------------------------------------------------
def _torchrun_program(out: Path) -> subprocess.CompletedProcess:
    lo = {"GLOO_SOCKET_IFNAME": loopback()} if loopback() else {}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(PROGRAM), str(out)],
                          cwd=ROOT, env=_env(**lo), capture_output=True, text=True, timeout=240)


def _native_abort(proc: subprocess.CompletedProcess, out: Path) -> bool:
    """A rank died of a native crash (SIGABRT/SIGSEGV) and no rank raised a Python error first.

    Every failure torchrun lists counts, not only its root cause: it orders them by whole seconds, so
    a rank 0 that exits in the same second as the crashed rank 1 may come first.
    """
    report = proc.stderr[proc.stderr.find("Failures:"):] if "Failures:" in proc.stderr else ""
    crashed = "(SIGABRT)" in report or "(SIGSEGV)" in report
    return crashed and not any(out.parent.glob(out.name + ".rank*.error"))


def _failure(proc: subprocess.CompletedProcess, out: Path) -> str:
    """What each rank reported: its Python traceback, the faulthandler dump of a native crash, the tail."""
    errors = "\n".join(f"{f.name}:\n{f.read_text()}" for f in sorted(out.parent.glob(out.name + ".rank*.error")))
    lines = proc.stderr.splitlines()
    native = [ln for ln in lines if ln.startswith(("Fatal Python error", "Thread 0x", "Current thread", '  File "',
                                                   "terminate called", "[rank"))]
    return f"{errors}\n--- rank output ---\n" + "\n".join(native[-80:]) + "\n--- tail ---\n" + proc.stderr[-1500:]


def test_two_gloo_ranks_give_the_gradients_and_weights_of_one_process(tmp_path):
    from tests.core.programs.dist_cge import B, SCENARIOS, run

    out = tmp_path / "res"
    proc = _torchrun_program(out)
    if proc.returncode != 0 and _native_abort(proc, out):
        # a rank died of a C++ abort with no Python error of its own. One cause is known and fixed (gloo's
        # worker thread freeing a collective's tensors during interpreter shutdown: see Shard._held); should
        # another remain, run once more, and say so in the test report
        warnings.warn(f"dist_cge: a rank aborted natively; ran again. {_failure(proc, out)}")
        for f in tmp_path.glob("res.rank*"):
            f.unlink()
        proc = _torchrun_program(out)
    assert proc.returncode == 0, _failure(proc, out)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    torch.set_num_threads(1)
    for name, (_, dtype, _, _, objective, steps, exact, _, calibrate, skew) in SCENARIOS.items():
        alone = run(name)
        for r, got in enumerate(ranks):
            got = got[name]
            # the exact split (parameters cut only where one process starts a new batch of
            # perturbations): bit for bit, float32 too; cut anywhere: equal within rounding
            check = torch.equal if exact and not skew else (
                lambda a, b: torch.allclose(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-9))
            assert all(check(a, b) for a, b in zip(alone["grads"], got["grads"])), (name, r)
            assert all(check(alone["weights"][k], got["weights"][k]) for k in alone["weights"]), (name, r)
            assert check(alone["losses"], got["losses"]), (name, r)
            # every rank does its own unperturbed forward (B queries a step) and the first step's
            # calibration costs a few more; the count is the sum over ranks, the same on both
            assert got["queries"] == alone["queries"] + B * steps + got["calibration_queries"], (name, r)
            assert (got["calibration_queries"] > 0) == (calibrate and objective == "supervised"), (name, r)
            # per rank: a warm-up on one coordinate per parameter and one forward per parameter timed
            assert got["calibration_queries"] <= 2 * B * (2 + 2 * got["params"]), (name, r)
        assert sum(g[name]["local_queries"] for g in ranks) == ranks[0][name]["queries"]
        # the last step moved its d values (and 40 bytes of checks per rank), never the weights
        assert sum(g[name]["bytes"] for g in ranks) == 2 * 40 + alone["active"] * dtype.itemsize
    assert ranks[0]["cnn-float64-sparse"]["costs"] is not None                      # calibrated on step 1
    # step 1 keeps parameters whole (the engine has not planned the shape yet); later steps cut
    assert ranks[0]["cnn-float32-batches"]["cut"] == [0, 1, 1]
    assert ranks[0]["cnn-float64-disagree"]["cut"] == [0, 0, 0]
    assert max(ranks[0]["cnn-float64-cut"]["cut"]) >= 1
    # rank 1 trained on other labels: both ranks refuse the step with the same message
    assert "the ranks disagree on the unperturbed loss" in ranks[0]["disagreement"]
    assert ranks[0]["disagreement"] == ranks[1]["disagreement"]
    # other masks on each rank (checks off): the shares' lengths differ, and the step stops on both
    assert "the ranks split the coordinates differently" in ranks[0]["other_masks"]
    assert ranks[0]["other_masks"] == ranks[1]["other_masks"]
    # as many active coordinates on both ranks, split differently: both stop, in the same words
    assert ranks[0]["swapped_masks"] == ranks[1]["swapped_masks"] == ranks[0]["other_masks"]


# -- the CLI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    (["--nproc", "0"], "--nproc must be >= 1; got 0"),
    (["--nproc", "-2"], "--nproc must be >= 1; got -2"),
    (["--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
    (["--nproc", "2", "--dist-timeout", "0"], "--dist-timeout must be a number of seconds > 0"),
    (["--nproc", "2", "--set", "optim.method=zo-rge"], "optim.method=zo-rge would repeat the same work"),
    (["--nproc", "2", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=2.5"],          # the ranks' grace, from the environment
     "TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds >= 0; got '2.5'"),
])
def test_bad_nproc_is_one_line(tmp_path, monkeypatch, capsys, args, expected):
    from applications.classification.cli import main

    monkeypatch.setenv("DEEPZERO_HOME", str(tmp_path))
    for name, _, value in (a.partition("=") for a in args if a.startswith("TORCH_")):
        monkeypatch.setenv(name, value)
    args = [a for a in args if not a.startswith("TORCH_")]
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


def _interrupt_rank(home: Path, rank: int, sig: int, *extra: str,
                    env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path, float]:
    """Start a 2-rank run, send ``sig`` to ``rank`` once epoch 1's checkpoint exists; wait for the end."""
    child = subprocess.Popen([sys.executable, "-m", "applications", *ARGS, "--nproc", "2", *extra], cwd=ROOT,
                             env=_env(DEEPZERO_HOME=str(home), **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline, ckpts = time.time() + 240, []
    while not ckpts and time.time() < deadline and child.poll() is None:
        ckpts = list((home / "runs" / "classify").glob("*/checkpoint.pt"))
        time.sleep(0.02)
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
    from core.runtime.experiment import run_experiment
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
    child = subprocess.Popen([sys.executable, "-m", "applications", *ARGS, "--set", "optim.epochs=400", "--nproc", "2"],
                             cwd=ROOT, env=_env(DEEPZERO_HOME=str(tmp_path)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, ckpts = time.time() + 240, []
    while not ckpts and time.time() < deadline and child.poll() is None:
        ckpts = list((tmp_path / "runs" / "classify").glob("*/checkpoint.pt"))
        time.sleep(0.02)
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
    from core.runtime.launch import _Reaper

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
        reaper = _Reaper(log, os.getpid(), grace=0.3)
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


def test_a_timed_out_collective_names_the_ranks_that_never_reached_it(monkeypatch):
    """Each rank counts the collectives it enters in the store; on a timeout the ranks with a lower
    count are named, on any other failure (a peer's connection closed) nobody is."""
    import torch.distributed as dist

    from core import collectives as D

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback() or "lo")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "7")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        store = D._store()
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
        for r, n in ((1, 2), (2, 1), (3, 3)):                     # where the other ranks got to
            store.add(D._key(r), n)
        for _ in range(3):
            D.arrive()                                            # this rank is in its 3rd collective
        assert D._key(0).startswith("deepzero/arrivals/7/") and store.add(D._key(0), 0) == 3
        assert D.counts() == [3, 2, 1, 3]
        timeout = RuntimeError("[../gloo/transport/tcp/pair.cc:598] Timed out waiting 5000ms for send operation")
        msg = str(D.lost("the gradient all-gather", timeout))
        assert msg.startswith("lost contact with ranks 1, 2, which never reached the gradient all-gather "
                              "(dead, or hung longer than the timeout); Timed out waiting 5000ms"), msg
        closed = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
        msg = str(D.lost("the gradient all-gather", closed))
        assert msg.startswith("lost contact with another rank during the gradient all-gather (Connection closed "
                              "by peer"), msg
        assert msg.endswith("a rank died, or hangs longer than the timeout")
        uncounted = str(D.lost("the gradient all-gather", timeout, counted=False))
        assert uncounted.startswith("lost contact with another rank during"), uncounted
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
        store.add(D._key(1), 1)
        store.add(D._key(2), 2)                                   # all three inside: nobody can be named
        assert str(D.lost("the gradient all-gather", timeout)).startswith("lost contact with another rank during")
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        msg = str(D.lost("the gradient all-gather", timeout))    # two ranks, both inside: it is the other one
        assert msg.startswith("lost contact with rank 1 inside the gradient all-gather, which it had reached "
                              "(it stopped answering: dead, hung, or the connection broke); Timed out"), msg
    finally:
        dist.destroy_process_group()
        D._arrived = 0
        D.rank_lost = False


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_the_loss_check_lets_a_diverged_step_through_and_stops_on_a_real_disagreement(monkeypatch, backend):
    """Every rank's loss ±inf or NaN is the training loop's divergence to report, not a disagreement
    (on NCCL the losses are compared within 1e-3, where inf − inf is NaN); different losses stop."""
    import torch.distributed as dist

    from core.distributed import RanksDisagree, Shard

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    shard = object.__new__(Shard)
    shard.group = None

    def metas(*losses):
        m = torch.zeros(len(losses), 5, dtype=torch.int64)
        m[:, 0] = torch.tensor(losses, dtype=torch.float64).view(torch.int64)
        return m

    for same in (float("inf"), float("-inf"), float("nan"), 2.5):
        shard._agree(metas(same, same, same))
    for differ in ((1.0, 2.0), (float("inf"), float("-inf")), (float("inf"), 1.0), (float("nan"), 1.0)):
        with pytest.raises(RanksDisagree, match="the ranks disagree on the unperturbed loss"):
            shard._agree(metas(*differ))
    with pytest.raises(RanksDisagree, match="different active sets"):
        m = metas(1.0, 1.0)
        m[1, 2] = 5
        shard._agree(m)


def test_ranks_get_the_command_without_nproc_and_without_abbreviations():
    from applications.classification.cli import _parser
    from core.runtime.launch import rank_argv

    argv = ["train", "--npr", "3", "--no", "--set", "optim.epochs=2", "--nproc=3", "--dist", "9", "--data-r=/d"]
    args = _parser("deepzero classify").parse_args(argv)
    assert args.nproc == 3 and args.dist_timeout == 9 and args.no_progress
    # torchrun reads its own options out of the whole line: '--no' or '--nproc' would match several
    assert rank_argv(args, argv[1:]) == ["--no-progress", "--set", "optim.epochs=2", "--dist-timeout", "9",
                                         "--data-root=/d"]


def test_estimators_built_later_get_their_shard_and_others_are_refused(monkeypatch):
    """An app that builds its CGE after the start (defense's zo-ds) or rebuilds it mid-run (KD freezing
    layers) gets a shard for it; a non-CGE estimator, or no CGE to come, is refused in one line."""
    import torch.distributed as dist

    from core import CGE, MeZO
    from core.runtime.errors import UserError
    from core.runtime.experiment import Experiment
    from core.runtime.ranks import Session
    from types import SimpleNamespace

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback() or "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(3, 2)

        class Lazy(Experiment):
            lazy_cge_methods = ("zo-ds",)

        exp = Lazy(SimpleNamespace(optim=SimpleNamespace(method="zo-ds")))
        Session(0, 2).attach(exp)                                 # no estimator yet: allowed, CGE to come
        exp.estimator = CGE(model, mu=1e-3)
        assert exp.estimator.shard is not None
        exp.estimator = CGE(model, mu=1e-3)                      # rebuilt mid-run: a shard again
        assert exp.estimator.shard is not None
        kept = exp.estimator
        with pytest.raises(UserError, match="split CGE's coordinates"):
            exp.estimator = MeZO(model, mu=1e-3)
        assert exp.estimator is kept                              # a refused estimator is not assigned
        eager = Experiment(SimpleNamespace(optim=SimpleNamespace(method="zo-ds")))
        with pytest.raises(UserError, match="split CGE's coordinates"):
            Session(0, 2).attach(eager)                           # nothing to split, and nothing to come
        assert eager.estimator is None
        with pytest.raises(UserError, match="every rank would query the teacher"):
            from applications.edge_kd.train import KDExperiment

            kd = Experiment.__new__(KDExperiment)                 # the class's declaration is what counts
            Experiment.__init__(kd, SimpleNamespace(optim=SimpleNamespace(method="zo-cge")))
            Session(0, 2).attach(kd)
    finally:
        dist.destroy_process_group()
