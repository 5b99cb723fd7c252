"""``deepzero ui`` and ``deepzero runs``: browsing the tracking store."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from core.runtime.cli import Parser, run_guarded
from core.runtime.errors import UserError


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
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


def ui_main(argv: list[str]) -> int:
    p = Parser(prog="deepzero ui", description="Open the MLflow UI on the project's tracking store.")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; anything else exposes your runs to the network)")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the UI to answer (default 120)")
    args = p.parse_args(argv)

    def go() -> int:
        from core.runtime.tracking import default_store, mark_model_training, tracking_uri

        if not 0 < args.port < 65536:
            raise UserError(f"--port must be in 1..65535; got {args.port}")
        if not _port_free(args.host, args.port):
            raise UserError(f"port {args.port} on {args.host} is already in use; pick another with --port")
        uri = tracking_uri()
        mark_model_training()                 # older experiments open on the runs table, not GenAI traces
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
        if "MLFLOW_TRACKING_URI" not in os.environ:
            default_store()[1].mkdir(parents=True, exist_ok=True)
            cmd += ["--default-artifact-root", default_store()[1].as_uri()]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        url = f"http://{args.host if ':' not in args.host else '[' + args.host + ']'}:{args.port}"
        print(f"starting the MLflow UI on {url} (store: {uri}) ...", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + args.wait
            while not _answers(f"{url}/health"):
                if proc.poll() is not None:
                    tail = (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()[-1:]
                    print(f"deepzero ui: error: the MLflow server exited ({proc.returncode})"
                          f"{': ' + tail[0] if tail else ''}", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print(f"deepzero ui: error: the MLflow UI did not answer within {args.wait:.0f} s",
                          file=sys.stderr)
                    return 1
                time.sleep(0.5)
            print(f"MLflow UI is up: {url}  (Ctrl-C to stop)", flush=True)
            proc.stderr.close()
            code = proc.wait()
            if code != 0:
                print(f"deepzero ui: error: the MLflow server stopped with status {code}", file=sys.stderr)
                return 1
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)

    code = run_guarded(go, "deepzero ui")
    return 0 if code == 130 else code         # Ctrl-C is how the UI is meant to stop


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
