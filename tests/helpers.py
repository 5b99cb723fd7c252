"""Helpers for tests that run the real ``deepzero`` command in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


_EMPTY_STORE: list[Path] = []           # this session's empty MLflow store, made once by MLflow itself


def with_store(home: Path) -> Path:
    """Give a new ``home`` an empty MLflow tracking store before a command opens it; returns ``home``.

    MLflow spends ~2 s creating a sqlite store's tables; the tests open dozens of fresh homes, so
    the store MLflow created once this session (same version, no runs, the default experiment only)
    is copied in instead. A home that has a store keeps it. Creating a store through deepzero's own
    code stays tested in process (tests/core/runtime/test_tracking.py).
    """
    import shutil
    import tempfile

    db = Path(home) / "mlflow" / "mlflow.db"
    if db.exists():
        return home
    if not _EMPTY_STORE:
        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="empty-store-", dir=os.environ.get("DEEPZERO_CACHE"))  # removed with it
        empty = Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{empty}").search_experiments()          # creates the tables
        _EMPTY_STORE.append(empty)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], db)
    return home


def process_env(*, store: bool = True, **extra: str) -> dict:
    """The environment of a child process on one thread that imports this checkout, with ``extra``
    set; the caller's tracking URI is dropped unless ``extra`` gives one. A ``DEEPZERO_HOME`` given
    gets the session's empty store first (:func:`with_store`) unless ``store`` is False."""
    if store and "DEEPZERO_HOME" in extra:
        with_store(Path(extra["DEEPZERO_HOME"]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    if "MLFLOW_TRACKING_URI" not in extra:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def deepzero(*args: str, home: Path, timeout: float = 300, env: dict | None = None,
             store: bool = True) -> subprocess.CompletedProcess:
    """``deepzero ARGS`` in a subprocess with ``$DEEPZERO_HOME=home`` and ``env``; ``store``: give a new
    home the session's empty MLflow store first (:func:`with_store`), False to see whether the
    command made one."""
    return subprocess.run([sys.executable, "-m", "applications", *args], cwd=ROOT,
                          env=process_env(store=store, DEEPZERO_HOME=str(home), **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def deepzero_in_process(*args: str, home: Path) -> subprocess.CompletedProcess:
    """``deepzero ARGS`` run by ``applications.cli.main`` in this process (for argument-error sweeps).

    Saves the ~3 s interpreter and import start-up of a subprocess per call; the result has the
    fields of a finished subprocess (exit status from the return value or ``SystemExit``).
    """
    from applications.cli import main

    return in_process(main, *args, home=home, prog="deepzero")


def in_process(main, *args: str, home: Path, prog: str) -> subprocess.CompletedProcess:
    """``main(list(args))`` with ``$DEEPZERO_HOME=home`` and its output captured, as a finished process.

    The global RNG states a command seeds (Python, NumPy, torch) are restored afterwards, so later
    tests do not depend on which commands ran before them in this process.
    """
    import contextlib
    import io

    import torch

    from core.runtime.seeding import get_rng_state, set_rng_state

    out, err = io.StringIO(), io.StringIO()
    gpu = "cuda" if torch.cuda.is_available() else None
    rng = get_rng_state(gpu)
    saved = {k: os.environ.get(k) for k in ("DEEPZERO_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["DEEPZERO_HOME"] = str(with_store(home))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        set_rng_state(rng, gpu)
    return subprocess.CompletedProcess([prog, *args], int(code or 0), out.getvalue(), err.getvalue())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert exit status 2 with exactly one line on stderr and no traceback; return that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "INFO mlflow" not in l]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def mlflow_client(home: Path):
    """An MLflow client on the tracking store a ``deepzero(..., home=home)`` run wrote."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")


def tracked_in_store(home: Path) -> dict[str, int]:
    """What the MLflow store under ``home`` holds of deepzero's: its experiments (``deepzero/*``) and
    all runs; zeros when no store was created.

    Read straight from the sqlite file, the store itself: a bad-input test uses it to show that the
    mistake stopped the command before it created an experiment or opened a run, without the
    seconds an MLflow client spends opening the store.
    """
    import sqlite3
    from contextlib import closing

    db = home / "mlflow" / "mlflow.db"
    if not db.is_file():
        return {"experiments": 0, "runs": 0}
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        experiments = con.execute("SELECT COUNT(*) FROM experiments WHERE name LIKE 'deepzero/%'").fetchone()[0]
        runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    return {"experiments": experiments, "runs": runs}
