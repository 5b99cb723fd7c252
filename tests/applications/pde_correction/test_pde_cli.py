"""``deepzero pde`` as users run it: the main job's smoke preset, an external solver that dies mid-run,
an HTTP solver, bad input."""
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import deepzero, mlflow_client as _client, one_line_error

FLAKY = Path(__file__).parent / "programs" / "flaky_burgers.py"


@pytest.fixture(scope="module")
def smoke_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("pde")
    proc = deepzero("pde", "run", "--preset", "smoke", "--no-progress", home=home, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return home, proc


def _table(stdout: str) -> dict[str, dict[str, str]]:
    lines = [l.split("\t") for l in stdout.splitlines() if "\t" in l]
    head = lines[0]
    return {row[0]: dict(zip(head, row)) for row in lines[1:]}


def test_run_smoke_trains_every_mode_and_zo_beats_the_solver_alone(smoke_home):
    home, proc = smoke_home
    table = _table(proc.stdout)
    assert set(table) == {"src", "non", "unrolled-net", "zo-sol-cge", "zo-sol-rge", "fo-sol"}
    assert float(table["zo-sol-cge"]["mae"]) < float(table["src"]["mae"])          # held-out conditions
    client = _client(home)
    exp = client.get_experiment_by_name("deepzero/pde")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "run-burgers"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(table)
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        if name != "src":
            assert {"mae", "mae_sem", "mae_final", "queries"} <= set(run.data.metrics), name
    zo = children["zo-sol-cge"]
    assert zo.data.tags["needs_differentiable_solver"] == "no"
    assert children["fo-sol"].data.tags["needs_differentiable_solver"] == "yes"
    # CGE's solver sample-steps: (d + 1) sets × B windows × m steps per step; smoke: d = 65, B = 4,
    # 8 steps at m = 1 then 8 at m = 4
    assert zo.data.metrics["queries"] == 66 * 4 * (8 * 1 + 8 * 4)
    assert children["unrolled-net"].data.metrics["queries"] == 4 * (8 * 1 + 8 * 4)
    assert {f"mae_{m}" for m in table} <= set(parent.data.metrics)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/mae.tsv", "evaluation/mae_vs_step.png", "evaluation/snapshots.png",
            "evaluation/rollout.gif"} <= arts
    gif = Path(client.download_artifacts(parent.info.run_id, "evaluation/rollout.gif", str(home / "dl")))
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")


def test_external_solver_dying_mid_training_stops_cleanly_and_resume_finishes(tmp_path):
    home = tmp_path / "h1"
    flag = tmp_path / "crash"
    flag.write_text("1")
    spec = f"exec:{sys.executable} {FLAKY} 45 {flag} n=16 nu=0.01 dt=0.05 umax=3.0"
    args = ("pde", "train", "--preset", "smoke", "--mode", "zo-sol", "--no-progress",
            "--set", f"solver.source={spec}", "--set", "solver.timeout=30")
    proc = deepzero(*args, home=home, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "stopped: solver failed at step" in proc.stderr and "crashing at call 45" in proc.stderr
    assert "Traceback" not in proc.stderr
    (ckpt,) = (home / "runs" / "pde").glob("*/checkpoint.pt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1                                # the first epoch's checkpoint is intact
    flag.unlink()
    proc = deepzero("pde", "train", "--resume", str(ckpt), "--no-progress", home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    done = torch.load(ckpt, weights_only=True)
    assert done["epoch"] == 2
    # the interrupted-then-resumed run equals an uninterrupted one with the in-process solver
    proc = deepzero("pde", "train", "--preset", "smoke", "--mode", "zo-sol", "--no-progress", home=tmp_path / "h2",
                    timeout=300)
    assert proc.returncode == 0, proc.stderr
    (clean,) = (tmp_path / "h2" / "runs" / "pde").glob("*/checkpoint.pt")
    clean = torch.load(clean, weights_only=True)
    for k, v in clean["model"].items():
        assert torch.equal(v, done["model"][k]), k


def test_http_solver_serves_the_evaluation_bit_for_bit(smoke_home):
    from solvers.burgers import Burgers
    from solvers.http import serve_in_thread

    home, _ = smoke_home
    server, url = serve_in_thread(Burgers(16, nu=0.01, dt=0.05, umax=3.0))
    try:
        proc = deepzero("pde", "evaluate", "src", "--preset", "smoke", "--no-progress",
                        "--set", f"solver.source={url}", "--set", "evaluate.gif_frames=0", home=home, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    over_http, in_process = _table(proc.stdout)["src"], _table(smoke_home[1].stdout)["src"]
    assert over_http["mae"] == in_process["mae"] and over_http["mae_final"] == in_process["mae_final"]


def test_evaluate_without_a_preset_takes_the_checkpoints_settings(smoke_home):
    """A smoke checkpoint evaluated with no --preset: its own data, solver and evaluate horizon apply."""
    home, proc = smoke_home
    ckpt = sorted((home / "runs" / "pde").glob("*/checkpoint.pt"))[0]
    out = deepzero("pde", "evaluate", "src", str(ckpt), "--no-progress",
                   home=home, timeout=300)
    assert out.returncode == 0, out.stderr
    assert _table(out.stdout)["src"]["mae"] == _table(proc.stdout)["src"]["mae"]


@pytest.mark.parametrize("args, needle", [
    (("train", "--preset", "smoke", "--mode", "src"), "nothing to train"),
    (("train", "--preset", "smoke", "--mode", "fo-sol", "--set", "solver.source=exec:nope"), "differentiable twin"),
    (("run", "--preset", "smoke", "--modes", "src,zo-sol-sgd"), "--modes: unknown mode 'zo-sol-sgd'"),
    (("generate", "--preset", "smoke", "--set", "solver.reference=exec:/nonexistent/solver"), "solver 'exec:"),
    (("evaluate", "/nonexistent.pt", "--preset", "smoke"), "nonexistent.pt"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    proc = deepzero("pde", *args, home=tmp_path, store=False)
    assert needle in one_line_error(proc)
    assert not (tmp_path / "mlflow" / "mlflow.db").exists() or not _runs(tmp_path)


def _runs(home):
    client = _client(home)
    exp = client.get_experiment_by_name("deepzero/pde")
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("overrides, needle", [
    (["train.mode=bogus"], "train.mode"),
    (["train.mode=zo-sol", "optim.method=fo"], "optim.method must be zo-cge"),
    (["train.unroll=1,x"], "train.unroll"),
    (["train.unroll=1,80"], "only data.steps = 60"),
    (["evaluate.horizon=60"], "must be below data.steps"),
    (["zo.sparsity=0.5", "zo.ratios=zo-grasp"], "zo.ratios=zo-grasp"),
    (["solver.family=heat"], "solver.family"),
    (["evaluate.every=80"], "'evaluate.every' (80) must be below data.steps"),
    (["train.unroll=1,2,4", "optim.epochs=2"], "3 unroll lengths for 2 epochs"),
    (["solver.family=wake", "data.train_sims=8"], "data.train_sims <= 6"),
    (["run.device=cuda"], "run.device=cuda: the PDE app runs on the CPU"),       # not ignored
    (["run.device=auto"], "run.device=auto: the PDE app runs on the CPU"),
])
def test_config_mistakes_name_the_key(overrides, needle):
    from applications.pde_correction.config import PRESET_DIR, PDEConfig
    from core.runtime.config import build_config
    from core.runtime.errors import UserError

    with pytest.raises(UserError) as err:
        build_config(PDEConfig, preset_dir=PRESET_DIR, preset="smoke", overrides=overrides).validate()
    assert needle in str(err.value)


def test_solver_dying_during_evaluation_is_one_line_with_status_1(tmp_path):
    flag = tmp_path / "crash"
    flag.write_text("1")
    spec = f"exec:{sys.executable} {FLAKY} 5 {flag} n=16 nu=0.01 dt=0.05 umax=3.0"
    proc = deepzero("pde", "evaluate", "src", "--preset", "smoke", "--no-progress", "--set", f"solver.source={spec}",
                    home=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "INFO mlflow" not in l]
    assert lines[-1].startswith("deepzero pde evaluate: error: evaluate stopped:") and "Traceback" not in proc.stderr
    assert not _runs(tmp_path)                                # no half-made evaluation run
