"""Distributed CGE: the split, 2 gloo ranks on 127.0.0.1 against 1 process, the per-step checks,
naming a lost rank, sharding an experiment's estimators (the launcher: tests/core/runtime/test_launch.py).

Every multi-process test runs real subprocesses (torchrun, the real ``deepzero`` command).
"""
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from core.sharding import split
from core.runtime.launch import loopback
from tests.helpers import ROOT, process_env

PROGRAM = ROOT / "tests" / "core" / "programs" / "dist_cge.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                          cwd=ROOT, env=process_env(**lo), capture_output=True, text=True, timeout=240)


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
        nccl = RuntimeError("[PG ID 0 PG GUID 0(default_pg) Rank 0] WorkNCCL(SeqNum=3, OpType=ALLGATHER) ran for "
                            "5000 milliseconds before timing out.")
        msg = str(D.lost("the gradient all-gather", nccl))       # NCCL's words for a timeout
        assert msg.startswith("lost contact with ranks 1, 2, which never reached the gradient all-gather"), msg
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
