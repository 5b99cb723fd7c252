"""``deepzero ui``: a port in use, the server's life from start to Ctrl-C, the runs view it saves.

The MLflow server is real and bound to 127.0.0.1; nothing here talks to anything else.
"""
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.helpers import ROOT, deepzero, one_line_error, process_env

CLASSIFY_COLUMNS = ["metrics.`test_accuracy`", "metrics.`train_loss`", "metrics.`queries`",
                    "metrics.`wall_time_s`"]


def test_a_port_in_use_is_one_line_naming_it(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = deepzero("ui", "--port", str(port), home=tmp_path, timeout=120, store=False)
    line = one_line_error(proc)
    assert str(port) in line and "in use" in line, line
    assert "is up" not in proc.stdout
    assert not (tmp_path / "mlflow").exists()               # refused before touching the store


def test_runs_view_lists_the_app_metrics_and_keeps_a_users_changes(store):
    from mlflow.tracking import MlflowClient

    from applications.tools import app_metrics, runs_link
    from core.runtime.tracking import (RUNS_VIEW_KEY, SAVED_VIEW_PREFIX, deepzero_experiments,
                                       ensure_runs_view, experiment_id, tracking_uri)

    client = MlflowClient(tracking_uri())
    exp = experiment_id("classify", client)
    other = client.create_experiment("somebody-else")
    assert [e.experiment_id for e in deepzero_experiments(client)] == [exp]

    assert ensure_runs_view(exp, app_metrics("classify"), client) == RUNS_VIEW_KEY
    view = json.loads(client.get_experiment(exp).tags[SAVED_VIEW_PREFIX + RUNS_VIEW_KEY])
    assert view["name"] and isinstance(view["createdAt"], int) and isinstance(view["updatedAt"], int)
    state = json.loads(view["state"])                       # the UI parses this string a second time
    assert state["selectedColumns"] == state["columnOrder"] == CLASSIFY_COLUMNS

    changed = json.dumps({**view, "state": json.dumps({"selectedColumns": ["metrics.`queries`"]})})
    client.set_experiment_tag(exp, SAVED_VIEW_PREFIX + RUNS_VIEW_KEY, changed)   # "Override saved view"
    assert ensure_runs_view(exp, app_metrics("classify"), client) == RUNS_VIEW_KEY
    assert client.get_experiment(exp).tags[SAVED_VIEW_PREFIX + RUNS_VIEW_KEY] == changed

    assert ensure_runs_view(other, (), client) is None      # nothing to show: no view
    assert not any(k.startswith(SAVED_VIEW_PREFIX) for k in client.get_experiment(other).tags)

    assert runs_link("http://127.0.0.1:5000", exp, RUNS_VIEW_KEY) == (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={RUNS_VIEW_KEY}")
    assert runs_link("http://127.0.0.1:5000", exp) == (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def _wait_for(lines: queue.Queue, seen: list, what: str, deadline: float) -> str:
    """The first line holding ``what`` (each line read is kept in ``seen``); fails at ``deadline``."""
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None or time.monotonic() > deadline:
            pytest.fail(f"no {what!r} line from deepzero ui; stdout so far: {''.join(seen)!r}")
        seen.append(line)
        if what in line:
            return line


def _drain(lines: queue.Queue) -> list[str]:
    got = []
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            return got
        if line is not None:
            got.append(line)


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:      # noqa: S310 - loopback only
        return r.status, r.read()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ui_serves_the_store_then_a_signal_stops_it_and_its_server(store, stop):
    from applications.tools import _port_free
    from core.runtime.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, RUNS_VIEW_KEY, Tracker

    with Tracker("classify", run_name="ui-test") as tr:    # an experiment and a run, as training makes them
        tr.log_metrics({"test_accuracy": 0.5, "queries": 10.0}, step=1)

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "applications", "ui", "--port", str(port)], cwd=ROOT,
        env=process_env(DEEPZERO_HOME=str(store)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as in a terminal, even when this test runs where SIGINT is ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out: queue.Queue = queue.Queue()
    err: queue.Queue = queue.Queue()
    readers = [threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True)]
    for t in readers:
        t.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 90
        up = _wait_for(out, seen, "is up", deadline)
        assert f"http://127.0.0.1:{port}" in up
        link = _wait_for(out, seen, "deepzero/classify: ", deadline).split(": ", 1)[1].strip()
        base = f"http://127.0.0.1:{port}"

        assert _get(f"{base}/health")[0] == 200
        status, body = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name"
                            "?experiment_name=deepzero/classify")
        assert status == 200
        exp = json.loads(body)["experiment"]
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
        assert link == (f"{base}/#/experiments/{exp['experiment_id']}/runs?workflowType=machine_learning"
                        f"&viewStateShareKey={RUNS_VIEW_KEY}")
        view = json.loads(tags[f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"])
        assert json.loads(view["state"])["selectedColumns"] == CLASSIFY_COLUMNS

        proc.send_signal(stop)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:                 # SIGTERM: deepzero ui still stops its server first
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for t in readers:
        t.join(timeout=10)
    stderr = "".join(_drain(err))
    assert "Traceback" not in stderr, stderr
    assert _port_free("127.0.0.1", port), "the MLflow server outlived deepzero ui"
