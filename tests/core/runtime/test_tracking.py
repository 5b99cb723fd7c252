import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core.runtime.tracking import Tracker, tracking_uri


def _log_a_run(tmp_path):
    with Tracker("unit", run_name="demo") as tr:
        tr.log_params({"train.lr": 0.1, "model.depth": 3})
        for step in range(250):
            tr.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 250}, step=step)
        tr.log_text("hello", "notes/readme.txt")
        from core.runtime.plotting import line_plot

        tr.log_figure(line_plot({"a": ([0, 1], [0, 1])}, xlabel="x", ylabel="y"), "plots/a.png")
    return tr.run_id


def test_run_in_embedded_sqlite_store_is_found_again(store):
    import mlflow
    from mlflow.tracking import MlflowClient

    run_id = _log_a_run(store)
    uri = tracking_uri()
    assert uri == f"sqlite:///{store / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["deepzero/unit"])
    assert list(runs["run_id"]) == [run_id]
    row = runs.iloc[0]
    assert row["params.train.lr"] == "0.1" and row["status"] == "FINISHED"
    from core.runtime.tracking import git_commit

    commit = git_commit()      # None only when the code is not in a git checkout
    if commit is not None:
        assert len(commit) == 40 and row["tags.mlflow.source.git.commit"] == commit
    assert row["tags.deepzero.command"]
    assert row["tags.version.torch"].startswith("2.")
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "loss")
    assert len(history) == 250 and history[-1].step == 249
    arts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"notes", "plots", "plots/a.png"} <= arts
    assert (store / "mlflow" / "artifacts").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_mlflow_server_round_trip(tmp_path, monkeypatch):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("DEEPZERO_HOME", str(tmp_path))
        run_id = _log_a_run(tmp_path)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        run = client.get_run(run_id)
        assert run.data.params["model.depth"] == "3"
        assert len(client.get_metric_history(run_id, "acc")) == 250
        assert "plots/a.png" in {a.path for a in client.list_artifacts(run_id, "plots")}
        assert not (tmp_path / "mlflow" / "mlflow.db").exists()   # nothing went to the embedded store
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert server.poll() is not None


def test_sqlite_store_keeps_artifacts_beside_its_database_from_any_directory(tmp_path, monkeypatch):
    """MLflow's own default for a client-side sqlite store is ./mlruns of the current directory."""
    from mlflow.tracking import MlflowClient

    from core.runtime.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, artifact_root, mark_model_training

    db = tmp_path / "store" / "runs.db"
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DEEPZERO_HOME", str(tmp_path / "home"))
    run_ids = []
    for where in ("a", "b"):                               # two runs started from two directories
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        with Tracker("unit", run_name=where) as tr:
            tr.log_text(f"from {where}", "notes/readme.txt")
        run_ids.append(tr.run_id)
        assert not (tmp_path / where / "mlruns").exists() and os.listdir(tmp_path / where) == []
    assert artifact_root(uri) == tmp_path / "store" / "artifacts"
    for where, run_id in zip("ab", run_ids):
        assert (tmp_path / "store" / "artifacts" / "unit" / run_id / "artifacts" / "notes" / "readme.txt"
                ).read_text() == f"from {where}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("deepzero/unit")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert exp.artifact_location == (tmp_path / "store" / "artifacts" / "unit").as_uri()

    # a named experiment; an older deepzero experiment without the kind tag gets it on next use
    with Tracker("unit", experiment="team/study 1") as tr:
        pass
    named = client.get_experiment_by_name("team/study 1")
    assert named.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert named.artifact_location.endswith("/store/artifacts/team_study_1")
    assert client.get_run(tr.run_id).info.experiment_id == named.experiment_id
    old = client.create_experiment("deepzero/old")
    other = client.create_experiment("somebody-else")
    with Tracker("old"):
        pass
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    older = client.create_experiment("deepzero/older")
    assert mark_model_training(client) == [older]
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(other).tags    # not ours: left alone
    assert not (tmp_path / "b" / "mlruns").exists()


def test_artifact_root_for_each_kind_of_store(tmp_path, monkeypatch):
    from core.runtime.tracking import artifact_root

    monkeypatch.chdir(tmp_path)
    assert artifact_root("sqlite:///rel/m.db") == tmp_path / "rel" / "artifacts"   # as sqlite opens it
    assert artifact_root("sqlite:////abs/dir/m.db") == Path("/abs/dir/artifacts")
    assert artifact_root("sqlite:///:memory:") is None
    for server in ("http://127.0.0.1:5000", "https://mlflow.example.org", "postgresql://u@h/db",
                   "databricks"):
        assert artifact_root(server) is None                                    # the server's choice
    monkeypatch.setenv("DEEPZERO_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert artifact_root() == tmp_path / "mlflow" / "artifacts"                   # the embedded default
