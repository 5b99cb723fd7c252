"""``deepzero ui`` and ``deepzero runs``: browsing the tracking store."""
from __future__ import annotations

import os
import subprocess
import sys

from core.runtime.cli import Parser, run_guarded
from core.runtime.errors import UserError


def ui_main(argv: list[str]) -> int:
    p = Parser(prog="deepzero ui", description="Open the MLflow UI on the project's tracking store.")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; anything else exposes your runs to the network)")
    args = p.parse_args(argv)

    def go() -> int:
        from core.runtime.tracking import default_store, tracking_uri

        if not 0 < args.port < 65536:
            raise UserError(f"--port must be in 1..65535; got {args.port}")
        uri = tracking_uri()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
        if "MLFLOW_TRACKING_URI" not in os.environ:
            default_store()[1].mkdir(parents=True, exist_ok=True)
            cmd += ["--default-artifact-root", default_store()[1].as_uri()]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        print(f"MLflow UI on http://{args.host}:{args.port}  (store: {uri}); Ctrl-C to stop", flush=True)
        try:
            return subprocess.call(cmd, env=env)
        except KeyboardInterrupt:
            return 0

    return run_guarded(go, "deepzero ui")


_KEY_METRICS = ("test_accuracy", "train_loss", "queries", "wall_time_s", "certified_accuracy", "mae")


def runs_main(argv: list[str]) -> int:
    p = Parser(prog="deepzero runs", description="Print recent runs of the tracking store as a table.")
    p.add_argument("--app", default=None, help="only this application (e.g. classify)")
    p.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    args = p.parse_args(argv)

    def go() -> int:
        import datetime as dt

        from core.runtime.tracking import client

        if args.limit < 1:
            raise UserError(f"--limit must be >= 1; got {args.limit}")
        c = client()
        exps = [e for e in c.search_experiments() if e.name.startswith("deepzero/")]
        if args.app:
            exps = [e for e in exps if e.name == f"deepzero/{args.app}"]
            if not exps:
                raise UserError(f"no runs for app '{args.app}' in {c.tracking_uri}")
        if not exps:
            print(f"no runs yet in {c.tracking_uri}")
            return 0
        names = {e.experiment_id: e.name.split("/", 1)[1] for e in exps}
        runs = c.search_runs(list(names), order_by=["attributes.start_time DESC"], max_results=args.limit)
        rows = [("app", "run id", "name", "status", "started", "metrics")]
        for r in runs:
            start = dt.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
            metrics = "  ".join(f"{k}={r.data.metrics[k]:.4g}" for k in _KEY_METRICS if k in r.data.metrics)
            rows.append((names[r.info.experiment_id], r.info.run_id, r.info.run_name or "", r.info.status,
                         start, metrics))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])
        return 0

    return run_guarded(go, "deepzero runs")
