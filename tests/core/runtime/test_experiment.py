"""The shared experiment loop, through a minimal app (tests/core/runtime/toy_app.py) run as users run apps."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from core.runtime.checkpoint import load_checkpoint
from core.runtime.errors import UserError
from tests.helpers import ROOT, in_process, one_line_error, process_env


def toy(*args, home, timeout=120):
    return subprocess.run([sys.executable, "-m", "tests.core.runtime.toy_app", "train", "--no-progress", *args],
                          cwd=ROOT, env=process_env(DEEPZERO_HOME=str(home)), capture_output=True, text=True,
                          timeout=timeout)


def toy_in_process(*args, home):
    """``toy train ARGS`` in this process: for refusals and ``--print-config``, which start no training."""
    from tests.core.runtime.toy_app import main

    return in_process(main, "train", "--no-progress", *args, home=home, prog="toy")


def toy_popen(*args, home):
    return subprocess.Popen([sys.executable, "-m", "tests.core.runtime.toy_app", "train", "--no-progress", *args],
                            cwd=ROOT, env=process_env(DEEPZERO_HOME=str(home)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _client(home):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")


def _wait_for_checkpoint(home, child, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and child.poll() is None:
        found = list((home / "runs" / "toy").glob("*/checkpoint.pt"))
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run_and_metrics_are_not_duplicated(tmp_path):
    args = ["--set", "data.sleep=0.05"]
    straight_home, killed_home = tmp_path / "a", tmp_path / "b"
    proc = toy(*args, home=straight_home)
    assert proc.returncode == 0, proc.stderr
    (straight,) = (straight_home / "runs" / "toy").glob("*/checkpoint.pt")

    child = toy_popen(*args, home=killed_home)
    ckpt = _wait_for_checkpoint(killed_home, child)
    time.sleep(0.12)                                    # a few steps of epoch 2 are logged, then killed
    child.send_signal(signal.SIGKILL)
    child.wait()
    partial = load_checkpoint(ckpt, app="toy")
    assert partial["epoch"] < 3, "the run finished before it could be killed"
    proc = toy("--resume", str(ckpt), home=killed_home)
    assert proc.returncode == 0, proc.stderr
    a, b = load_checkpoint(straight, app="toy"), load_checkpoint(ckpt, app="toy")
    assert b["epoch"] == 3 and b["mlflow_run_id"] == partial["mlflow_run_id"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["estimator"]["queries"] == b["estimator"]["queries"]
    assert a["blackboxes"] == b["blackboxes"] and a["blackboxes"]["2"]["queries"] > 0
    ca, cb = _client(straight_home), _client(killed_home)
    for key in ("step_loss", "test_mse", "queries"):
        ha, hb = _history(ca, a["mlflow_run_id"], key), _history(cb, b["mlflow_run_id"], key)
        assert ha == hb, key                             # every point once, with the same values
    assert cb.get_run(b["mlflow_run_id"]).info.status == "FINISHED"


def test_resume_refuses_unsafe_changes_and_applies_safe_ones(tmp_path):
    proc = toy("--set", "optim.epochs=1", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (ckpt,) = (tmp_path / "runs" / "toy").glob("*/checkpoint.pt")
    line = one_line_error(toy_in_process("--resume", str(ckpt), "--set", "zo.mu=0.1", home=tmp_path))
    assert "--resume cannot change 'zo.mu'" in line and "optim.epochs" in line
    line = one_line_error(toy_in_process("--resume", str(ckpt), "--preset", "default", home=tmp_path))
    assert "drop --preset" in line
    assert load_checkpoint(ckpt, app="toy")["epoch"] == 1                  # the refusals changed nothing
    proc = toy("--resume", str(ckpt), "--set", "optim.epochs=2", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(ckpt, app="toy")["epoch"] == 2
    proc = toy_in_process("--resume", str(ckpt), "--set", "optim.epochs=2", "--print-config", home=tmp_path)
    assert proc.returncode == 0 and "epochs: 2" in proc.stdout


def test_resume_config_unit():
    from core.runtime.loop import resume_config
    from tests.core.runtime.toy_app import ToyConfig
    import dataclasses

    saved = dataclasses.asdict(ToyConfig())
    cfg = resume_config(ToyConfig, saved, overrides=["optim.epochs=7", "zo.mu=0.001"])   # same mu: not a change
    assert cfg.optim.epochs == 7
    with pytest.raises(UserError, match="cannot change 'data.n'"):
        resume_config(ToyConfig, saved, overrides=["data.n=10"])


def test_budget_stop_keeps_checkpoint_and_resume_keeps_the_spent_budget(tmp_path):
    # a step costs (q + 1) · 16 = 80 queries in calls of 16; an epoch 6 steps = 480 queries.
    # Budget 700: epoch 1 (480), then 2 steps (640) and 3 calls of step 3 (688): the 4th call is refused.
    proc = toy("--set", "data.budget=700", home=tmp_path)
    assert proc.returncode == 1
    assert "stopped: BlackBox 'oracle' query budget exhausted: 688 of 700 used" in proc.stderr
    assert "resume with:" in proc.stderr and "Traceback" not in proc.stderr
    (ckpt,) = (tmp_path / "runs" / "toy").glob("*/checkpoint.pt")
    state = load_checkpoint(ckpt, app="toy")
    box = state["blackboxes"]["2"]
    assert state["epoch"] == 1 and box["queries"] == 480 and box["lost"] == 208     # spent after the checkpoint
    client = _client(tmp_path)
    run = client.get_run(state["mlflow_run_id"])
    assert "query budget exhausted" in run.data.tags["deepzero.stop_reason"]
    # the same budget: 700 − 208 = 492 left for a counter at 480, less than one call — it stops at once
    proc = toy("--resume", str(ckpt), home=tmp_path)
    assert proc.returncode == 1 and "budget exhausted: 480 of 492 used" in proc.stderr
    assert load_checkpoint(ckpt, app="toy")["blackboxes"]["2"]["lost"] == 208       # nothing new was spent
    proc = toy("--resume", str(ckpt), "--set", "data.budget=2000", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    final = load_checkpoint(ckpt, app="toy")["blackboxes"]["2"]
    assert final["queries"] == 1440 and final["queries"] + final["lost"] <= 2000
    run = client.get_run(state["mlflow_run_id"])
    assert "deepzero.stop_reason" not in run.data.tags and run.info.status == "FINISHED"
    # the stop flushed epoch 2's first step points; the resume replayed them: each step is logged once
    steps = sorted(m.step for m in client.get_metric_history(state["mlflow_run_id"], "step_loss"))
    assert steps == list(range(1, 19))


@pytest.mark.slow
def test_ctrl_c_prints_the_exact_resume_command(tmp_path):
    child = toy_popen("--set", "data.sleep=0.05", home=tmp_path)
    ckpt = _wait_for_checkpoint(tmp_path, child)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    lines = err.splitlines()
    cmd = f"DEEPZERO_HOME={tmp_path} toy train --resume {ckpt}"       # the store it was started with
    assert any(line.strip() == cmd for line in lines), err
    assert "Traceback" not in err
