"""``deepzero ui`` and ``deepzero runs``: browsing the tracking store."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from core.runtime.cli import Parser, run_guarded
from core.runtime.errors import UserError


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (as uvicorn binds: with SO_REUSEADDR).

    Without SO_REUSEADDR the TIME_WAIT connections a stopped server leaves (about a minute) would
    read as "in use"; with it, bind still fails while anything listens there.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name == "posix":                    # elsewhere SO_REUSEADDR may share a port in use
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _answers(url: str, timeout: float = 2.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:   # noqa: S310 - loopback URL we built
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def runs_link(url: str, exp_id: str, view_key: str | None = None) -> str:
    """The MLflow 3.17 UI's runs table of experiment ``exp_id``, opened with saved view ``view_key``.

    ``workflowType=machine_learning`` picks the UI's "Model training" side: without it the UI
    follows the switch last chosen in that browser, GenAI by default, and opens the experiment on
    its traces overview (the ``mlflow.experimentKind`` tag no longer decides).
    """
    link = f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    return f"{link}&viewStateShareKey={view_key}" if view_key else link


def ui_main(argv: list[str]) -> int:
    p = Parser(prog="deepzero ui", description="Open the MLflow UI on the project's tracking store.")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; anything else exposes your runs to the network)")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the UI to answer (default 120)")
    args = p.parse_args(argv)

    def go() -> int:
        from core.runtime.tracking import (default_store, deepzero_experiments, ensure_runs_view,
                                           mark_model_training, tracking_uri)

        if not 0 < args.port < 65536:
            raise UserError(f"--port must be in 1..65535; got {args.port}")
        if not _port_free(args.host, args.port):
            raise UserError(f"port {args.port} on {args.host} is already in use; pick another with --port")
        uri = tracking_uri()
        mark_model_training()                 # the kind tag, for stores written before it existed
        views = []                            # (experiment, its runs view with the app's key metrics)
        for exp in sorted(deepzero_experiments(), key=lambda e: e.name):
            app = exp.tags.get("deepzero.app") or exp.name.partition("/")[2]
            views.append((exp, ensure_runs_view(exp.experiment_id, app_metrics(app))))
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
        if "MLFLOW_TRACKING_URI" not in os.environ:
            default_store()[1].mkdir(parents=True, exist_ok=True)
            cmd += ["--default-artifact-root", default_store()[1].as_uri()]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        url = f"http://{args.host if ':' not in args.host else '[' + args.host + ']'}:{args.port}"
        print(f"starting the MLflow UI on {url} (store: {uri}) ...", flush=True)
        with _stop_on_term():
            return _serve(cmd, env, url, args.wait, views)

    code = run_guarded(go, "deepzero ui")
    return 0 if code == 130 else code         # Ctrl-C is how the UI is meant to stop


@contextlib.contextmanager
def _stop_on_term():
    """SIGTERM and SIGHUP (``kill``, a closed terminal) stop ``deepzero ui`` as Ctrl-C does.

    Their default action would end this process at once and leave the MLflow server (its own
    session, so that Ctrl-C reaches only us) running without a parent.
    """
    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(cmd: list[str], env: dict, url: str, wait: float, views: list) -> int:
    """Run the MLflow server until it stops or we are interrupted; the server never outlives us."""
    proc = None
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + wait
        while not _answers(f"{url}/health"):
            if proc.poll() is not None:
                tail = (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()[-1:]
                print(f"deepzero ui: error: the MLflow server exited ({proc.returncode})"
                      f"{': ' + tail[0] if tail else ''}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"deepzero ui: error: the MLflow UI did not answer within {wait:.0f} s",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"MLflow UI is up: {url}  (Ctrl-C to stop)", flush=True)
        if views:
            print("runs, with each app's key metrics as columns:")
        for exp, key in views:
            print(f"  {exp.name}: {runs_link(url, exp.experiment_id, key)}")
        sys.stdout.flush()
        proc.stderr.close()
        code = proc.wait()
        if code != 0:
            print(f"deepzero ui: error: the MLflow server stopped with status {code}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None:
            _end_group(proc)


def _end_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the server's whole process group (mlflow's CLI and its uvicorn): SIGTERM, then SIGKILL."""
    def alive() -> bool:
        proc.poll()                                   # reap the leader so that it stops counting
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive():
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def app_metrics(app: str) -> tuple[str, ...]:
    from applications.cli import APPS

    entry = APPS.get(app)
    return entry[2] if entry else ("queries", "wall_time_s")


FORMATS = ("table", "csv", "json")


def runs_main(argv: list[str]) -> int:
    p = Parser(prog="deepzero runs", description="Print recent runs of the tracking store.")
    p.add_argument("--app", default=None, help="only this application (e.g. classify)")
    p.add_argument("--experiment", default=None, help="only this MLflow experiment (default: every deepzero/* one)")
    p.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    p.add_argument("--format", default="table", help="table (default), csv or json (every metric and param)")
    args = p.parse_args(argv)

    def go() -> int:
        import datetime as dt

        from core.runtime.tracking import client

        if args.limit < 1:
            raise UserError(f"--limit must be >= 1; got {args.limit}")
        if args.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}; got '{args.format}'")
        c = client()
        exps = c.search_experiments()
        if args.experiment:
            exps = [e for e in exps if e.name == args.experiment]
            if not exps:
                raise UserError(f"no experiment named '{args.experiment}' in {c.tracking_uri}")
        else:
            exps = [e for e in exps if e.name.startswith("deepzero/") or "deepzero.app" in e.tags]
        if args.app:
            exps = [e for e in exps if e.tags.get("deepzero.app", e.name.split("/", 1)[-1]) == args.app]
            if not exps:
                raise UserError(f"no runs for app '{args.app}' in {c.tracking_uri}")
        if not exps:
            print(f"no runs yet in {c.tracking_uri}")
            return 0
        names = {e.experiment_id: e.name for e in exps}
        runs = c.search_runs(list(names), order_by=["attributes.start_time DESC"], max_results=args.limit)
        records = []
        for r in runs:
            app = r.data.tags.get("deepzero.app", names[r.info.experiment_id].split("/", 1)[-1])
            records.append({"app": app, "experiment": names[r.info.experiment_id], "run_id": r.info.run_id,
                            "name": r.info.run_name or "", "status": r.info.status,
                            "started": dt.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
                            "metrics": dict(r.data.metrics), "params": dict(r.data.params)})
        if args.format == "json":
            import json

            print(json.dumps(records, indent=2))
        elif args.format == "csv":
            _print_csv(records)
        else:
            _print_table(records)
        return 0

    return run_guarded(go, "deepzero runs")


def _print_csv(records: list[dict]) -> None:
    import csv

    metric_keys = sorted({k for r in records for k in r["metrics"]})
    param_keys = sorted({k for r in records for k in r["params"]})
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["app", "experiment", "run_id", "name", "status", "started", *metric_keys,
                *[f"param.{k}" for k in param_keys]])
    for r in records:
        w.writerow([r[k] for k in ("app", "experiment", "run_id", "name", "status", "started")]
                   + [r["metrics"].get(k, "") for k in metric_keys] + [r["params"].get(k, "") for k in param_keys])


def _print_table(records: list[dict]) -> None:
    rows = [("app", "run id", "name", "status", "started", "metrics")]
    for r in records:
        metrics = "  ".join(f"{k}={r['metrics'][k]:.4g}" for k in app_metrics(r["app"]) if k in r["metrics"])
        rows.append((r["app"], r["run_id"], r["name"], r["status"], r["started"], metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])
