import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, deepzero, deepzero_in_process, one_line_error, process_env, tracked_in_store


def test_smoke_preset_end_to_end(tmp_path):
    proc = deepzero("classify", "train", "--preset", "smoke", "--no-progress", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deepzero/classify")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    acc = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert len(acc) == 2 and acc[-1].value > 0.3            # chance is 0.1
    assert run.data.params["optim.method"] == "zo-cge" and run.data.tags["seed"] == "0"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/accuracy_vs_epoch.png", "plots/accuracy_vs_queries.png", "plots/accuracy_vs_wall_time.png"} <= plots
    assert "sparsity/ratios.json" in {a.path for a in client.list_artifacts(run.info.run_id, "sparsity")}
    assert len(client.get_metric_history(run.info.run_id, "step_loss")) == 2 * 63
    # the checkpoint describes its model: `evaluate` rebuilds it (Normalize first, [0, 1] pixels)
    (ckpt,) = (tmp_path / "runs" / "classify").glob("*/checkpoint.pt")
    proc = deepzero("classify", "evaluate", str(ckpt), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = float(proc.stdout.split("test accuracy ")[1].split()[0])
    assert abs(got - acc[-1].value) <= 2e-3, (got, acc[-1].value)
    evals = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("deepzero.verb") == "evaluate"]
    assert len(evals) == 1 and evals[0].data.tags["deepzero.source_run"] == run.info.run_id
    # export
    import json

    proc = deepzero("runs", "--format", "json", home=tmp_path)
    records = json.loads(proc.stdout)
    assert {r["run_id"] for r in records} == {run.info.run_id, evals[0].info.run_id}
    assert tracked_in_store(tmp_path) == {"experiments": 1, "runs": 2}     # the bad-input tests rely on it
    assert [r for r in records if r["run_id"] == run.info.run_id][0]["metrics"]["test_accuracy"] == acc[-1].value
    proc = deepzero("runs", "--format", "csv", "--app", "classify", home=tmp_path)
    header = proc.stdout.splitlines()[0].split(",")
    assert proc.returncode == 0 and "test_accuracy" in header and "param.optim.method" in header


@pytest.mark.parametrize("args,expected", [
    (["--set", "optim.lr=fast"], "bad value for config key 'optim.lr'"),
    (["--set", "optim.bogus=1"], "unknown config key 'optim.bogus'"),
    (["--set", "optim.method=sgd"], "must be one of zo-cge, zo-rge, zo-mezo, fo"),
    (["--preset", "nope"], "unknown preset 'nope'; available presets: default, paper, smoke, study"),
    (["--set", "data.name=cifar10", "--data-root", "/nonexistent/dir"], "--data-root not found"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
])
def test_user_mistakes_are_one_line(tmp_path, args, expected):
    line = one_line_error(deepzero("classify", "train", "--preset", "smoke", *args, home=tmp_path))
    assert expected in line


def test_wrong_data_layout_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    line = one_line_error(deepzero_in_process("classify", "train", "--set", "data.name=cifar10", "--data-root",
                                              str(tmp_path / "data"), home=tmp_path))
    assert "cifar-10-batches-py/" in line
    # the mistake surfaced before any MLflow run was opened: nothing half-made is left behind
    assert tracked_in_store(tmp_path) == {"experiments": 0, "runs": 0}


def test_print_config(tmp_path):
    proc = deepzero("classify", "train", "--preset", "smoke", "--set", "optim.lr=0.25", "--print-config",
                    home=tmp_path)
    assert proc.returncode == 0 and "lr: 0.25" in proc.stdout and "method: zo-cge" in proc.stdout


def test_prune_writes_ratios_that_train_accepts(tmp_path):
    out = tmp_path / "r.json"
    proc = deepzero("classify", "prune", "--preset", "smoke", "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pruned_ratio" in proc.stdout and out.is_file()
    proc = deepzero("classify", "train", "--preset", "smoke", "--ratios", str(out), "--set", "optim.epochs=1",
                    "--set", "data.train_subset=256", "--no-progress", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "bad.json").write_text("[]")
    line = one_line_error(deepzero("classify", "train", "--preset", "smoke", "--ratios", str(tmp_path / "bad.json"),
                                   home=tmp_path))
    assert "not a deepzero ratios file" in line


RESUME_ARGS = ["classify", "train", "--preset", "smoke", "--no-progress", "--set", "optim.epochs=3",
               "--set", "data.train_subset=1500", "--set", "optim.method=zo-rge", "--set", "zo.q=8",
               "--set", "optim.lr=0.02"]


def _weights(path):
    from core.runtime.checkpoint import load_checkpoint

    return load_checkpoint(path, app="classify")


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    straight_home, killed_home = tmp_path / "a", tmp_path / "b"
    proc = deepzero(*RESUME_ARGS, home=straight_home)
    assert proc.returncode == 0, proc.stderr
    (straight,) = (straight_home / "runs" / "classify").glob("*/checkpoint.pt")

    child = subprocess.Popen([sys.executable, "-m", "applications", *RESUME_ARGS], cwd=ROOT,
                             env=process_env(DEEPZERO_HOME=str(killed_home)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ckpts = []
    while not ckpts and time.time() < deadline and child.poll() is None:
        ckpts = list((killed_home / "runs" / "classify").glob("*/checkpoint.pt"))
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert ckpts, "no checkpoint appeared"
    partial = _weights(ckpts[0])
    assert partial["epoch"] < 3, "the process finished before it could be killed"
    proc = deepzero("classify", "train", "--resume", str(ckpts[0]), "--no-progress", home=killed_home)
    assert proc.returncode == 0, proc.stderr
    a, b = _weights(straight), _weights(ckpts[0])
    assert b["epoch"] == 3 and b["mlflow_run_id"] == partial["mlflow_run_id"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["test_accuracy"] for h in a["history"]] == [h["test_accuracy"] for h in b["history"]]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{killed_home / 'mlflow' / 'mlflow.db'}")
    assert client.get_run(b["mlflow_run_id"]).info.status == "FINISHED"
    assert len(client.get_metric_history(b["mlflow_run_id"], "test_accuracy")) == 3
    steps = sorted(m.step for m in client.get_metric_history(b["mlflow_run_id"], "step_loss"))
    assert steps == list(range(1, 3 * 24 + 1))          # every step once: none re-logged by the resume


def test_quick_study_print_config_shows_what_runs(tmp_path):
    proc = deepzero("classify", "study", "--quick", "--print-config", home=tmp_path)
    assert proc.returncode == 0 and "epochs: 2" in proc.stdout and "train_subset: 512" in proc.stdout


def test_prune_into_an_existing_directory(tmp_path):
    out = tmp_path / "ratios"
    out.mkdir()
    proc = deepzero("classify", "prune", "--preset", "smoke", "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("ratios-*.json"))) == 1
    line = one_line_error(deepzero("classify", "prune", "--bogus", home=tmp_path))
    assert "deepzero classify prune --help" in line


def test_study_logs_a_parent_with_child_runs_table_and_plots(tmp_path):
    proc = deepzero("classify", "study", "--quick", "--depths", "1", "--methods", "fo,cge", "--seeds", "2",
                    "--no-progress", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test acc (%)" in proc.stdout and "cge" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deepzero/classify")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/table.tsv", "study/accuracy_vs_params.png", "study/accuracy_vs_queries.png"} <= arts
    assert "unknown" not in proc.stderr
    bad = one_line_error(deepzero("classify", "study", "--methods", "fo,sgd", home=tmp_path))
    assert "--methods must be a subset of fo,cge,rge" in bad
