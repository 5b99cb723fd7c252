import os
import socket
import subprocess
import sys
import time
import urllib.request

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
