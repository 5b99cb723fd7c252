"""MLflow tracking as every deepzero command uses it.

- Experiment ``deepzero/<app>``; params = the flattened config; tags = seed, git commit, package
  versions and the command line; metrics are buffered and sent with ``log_batch`` (one call per
  metric to a sqlite store costs ~10 ms); plots, tables and checkpoints are artifacts.
- Store: ``MLFLOW_TRACKING_URI`` when set (the MLflow convention), else the embedded sqlite file
  ``mlflow/mlflow.db`` under the project root with artifacts in ``mlflow/artifacts/``.
- Artifacts of a client-side sqlite store go beside its database, ``<db dir>/artifacts/<app>``
  (MLflow's own default for such a store is ``./mlruns`` of whatever directory a run starts in,
  which scatters them and litters checkouts); a tracking server (http/https) keeps its own choice.
- Every deepzero experiment carries the tag ``mlflow.experimentKind = custom_model_development``
  (MLflow 3 UIs before the GenAI / Model training switch open such an experiment on its runs table;
  MLflow 3.17's UI ignores the tag and follows the switch, or ``?workflowType=machine_learning`` in
  the URL, which is why ``deepzero ui`` prints links carrying it).
- ``deepzero ui`` saves on each deepzero experiment a view of the runs table with the app's key
  metrics as columns (:func:`ensure_runs_view`): MLflow 3.17 shows no metric column by default.

Only ``MlflowClient`` is used (no global active run), so trackers nest and never leak state.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

_PACKAGES = ("torch", "torchvision", "numpy", "mlflow", "phiflow", "scipy")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"      # the kind pre-3.17 MLflow 3 UIs open on the runs table
SAVED_VIEW_PREFIX = "mlflow.sharedViewState."   # + key: a saved view of the runs table (MLflow UI)
RUNS_VIEW_KEY = "deepzero-key-metrics"
RUNS_VIEW_NAME = "deepzero: key metrics"


def project_root() -> Path:
    """``$DEEPZERO_HOME``, else the checkout holding this package, else the working directory."""
    env = os.environ.get("DEEPZERO_HOME")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").is_file() and (here / "core").is_dir():
        return here
    return Path.cwd()


def default_store() -> tuple[str, Path]:
    base = project_root() / "mlflow"
    return f"sqlite:///{base / 'mlflow.db'}", base / "artifacts"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_store()[0]


def client():
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def artifact_root(uri: str | None = None) -> Path | None:
    """The folder deepzero puts experiments' artifacts in for tracking store ``uri``; None: MLflow's choice.

    Any client-side sqlite store, the embedded default included: ``<db dir>/artifacts``. A server
    (http/https), another database or a file store (MLflow keeps artifacts inside it): None.
    """
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve().parent / "artifacts"   # relative: as sqlite opens it


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def experiment_id(app: str, mlclient=None, *, name: str | None = None) -> str:
    """Get or create the experiment ``name`` (default ``deepzero/<app>``), tagged as model training.

    A new experiment's artifacts go to :func:`artifact_root` ``/<app>`` (``/<name>`` for another
    name) when the store has such a root; an existing experiment without the kind tag gets it.
    """
    mlclient = mlclient or client()
    name = name or f"deepzero/{app}"
    exp = mlclient.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlclient.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id
    root = artifact_root(mlclient.tracking_uri)
    location = None
    if root is not None:
        location = (root / _slug(app if name == f"deepzero/{app}" else name)).as_uri()
    try:
        return mlclient.create_experiment(name, artifact_location=location,
                                          tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING, "deepzero.app": app})
    except Exception:  # created concurrently by another process
        exp = mlclient.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def mark_model_training(mlclient=None) -> list[str]:
    """Tag every ``deepzero/*`` experiment lacking ``mlflow.experimentKind`` as model training.

    For stores written before the tag existed; returns the ids of the experiments tagged.
    """
    mlclient = mlclient or client()
    marked = []
    for exp in mlclient.search_experiments(filter_string="name LIKE 'deepzero/%'", max_results=1000):
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlclient.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            marked.append(exp.experiment_id)
    return marked


def deepzero_experiments(mlclient=None) -> list:
    """The store's active experiments deepzero wrote: named ``deepzero/*`` or tagged ``deepzero.app``."""
    mlclient = mlclient or client()
    return [e for e in mlclient.search_experiments(max_results=1000)
            if e.name.startswith("deepzero/") or "deepzero.app" in e.tags]


def ensure_runs_view(exp_id: str, metrics, mlclient=None, *, key: str = RUNS_VIEW_KEY,
                     name: str = RUNS_VIEW_NAME) -> str | None:
    """Save on experiment ``exp_id`` a view of the MLflow UI's runs table with ``metrics`` as its columns.

    MLflow 3.17's runs table shows no metric column until one is picked under "Columns"; its saved
    views (the "Views" menu) are experiment tags ``mlflow.sharedViewState.<key>`` holding
    ``{"name", "createdAt", "updatedAt", "state"}`` (``state``: the table's UI state as JSON), opened
    at ``#/experiments/<id>/runs?viewStateShareKey=<key>``. An existing view is left as it is (a
    user may have changed it with "Override saved view"; deleting it makes the next call recreate
    it). Returns ``key``; None when there are no metrics to show.
    """
    import json

    metrics = list(metrics)
    if not metrics:
        return None
    mlclient = mlclient or client()
    if SAVED_VIEW_PREFIX + key in mlclient.get_experiment(exp_id).tags:
        return key
    columns = [f"metrics.`{m}`" for m in metrics]          # the UI's column ids, in the app's order
    now = int(time.time() * 1000)
    state = json.dumps({"selectedColumns": columns, "columnOrder": columns})
    mlclient.set_experiment_tag(exp_id, SAVED_VIEW_PREFIX + key,
                                json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": state}))
    return key


def git_commit() -> str | None:
    """The commit of the code that runs (its checkout, wherever the store lives); None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


class RunNotFound(ValueError):
    """The MLflow run a checkpoint names is not in the current tracking store."""


class Tracker:
    """One MLflow run: params, tags, buffered metrics and artifacts.

    Args:
        app: application name (tag ``deepzero.app``).
        experiment: the MLflow experiment (default ``deepzero/<app>``); created when missing.
        run_name: the run's display name.
        run_id: continue this existing run (``--resume``) instead of creating one.
        parent_run_id: make this a child run (for studies).
        flush_every: buffered metric values sent per ``log_batch`` call.
    """

    def __init__(self, app: str, *, experiment: str | None = None, run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, flush_every: int = 500) -> None:
        self.app, self.run_name, self.parent_run_id = app, run_name, parent_run_id
        self.experiment = experiment or f"deepzero/{app}"
        self.flush_every = flush_every
        self._resume_id = run_id
        self._metrics: list[Any] = []
        self.client = None
        self.run_id: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Tracker":
        from mlflow.entities import RunTag

        self.client = client()
        if self._resume_id:
            from mlflow.exceptions import MlflowException

            try:
                run = self.client.get_run(self._resume_id)
            except MlflowException:
                raise RunNotFound(f"the run {self._resume_id} to resume is not in the tracking store "
                                  f"{self.client.tracking_uri}: resume with the DEEPZERO_HOME / MLFLOW_TRACKING_URI "
                                  "the run was started with") from None
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING", name=self.run_name or run.info.run_name)
            self.resumed = True
            return self
        self.resumed = False
        exp = experiment_id(self.app, self.client, name=self.experiment)
        tags = {"deepzero.app": self.app, "deepzero.command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        for name, ver in package_versions().items():
            tags[f"version.{name}"] = ver
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(exp, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return self

    def end(self, status: str = "FINISHED") -> None:
        if self.client is None or self.run_id is None:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "Tracker":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # -- logging -----------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (skipped when resuming: they were logged by the first process)."""
        from mlflow.entities import Param

        if getattr(self, "resumed", False):
            return
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def delete_tag(self, key: str) -> None:
        """Remove a run tag if it is set (e.g. a stop reason once a resumed run completes)."""
        if key in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, key)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffer metric values; they are sent in batches (see ``flush``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._metrics.append(Metric(key, float(value), now, int(step or 0)))
        if len(self._metrics) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._metrics:
            chunk, self._metrics = self._metrics[:1000], self._metrics[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _log_written(self, artifact_file: str, write) -> None:
        """Write a file with ``write(path)`` in a temporary folder and log it at ``artifact_file``."""
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            write(target)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(target, None if parent == "." else parent)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._log_written(artifact_file, lambda path: path.write_text(text))

    def log_figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self._log_written(artifact_file, lambda path: fig.savefig(path, dpi=120, bbox_inches="tight"))
        finally:
            plt.close(fig)


class NullTracker:
    """Stands in for :class:`Tracker` on the ranks other than 0 of a multi-process run: logs nothing.

    Only rank 0 talks to MLflow; the other ranks run the same loop against this object.
    """

    client = None
    resumed = False

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def delete_tag(self, key: str) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        plt.close(fig)
