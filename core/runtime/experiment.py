"""The contract every application fulfils: an :class:`Experiment` owns what one run trains.

An application subclasses :class:`Experiment` and supplies what is its own — building its objects
from the config, the batches of an epoch, one training step and an evaluation::

    class MyExperiment(Experiment):
        app = "myapp"

        def __init__(self, cfg, *, resume=None):
            super().__init__(cfg, resume=resume)
            self.model = ...; self.optimizer, self.scheduler = make_optimizer(...)
            self.estimator = make_estimator(...)

        def batches(self, epoch): ...               # iterable of whatever train_step takes
        def train_step(self, batch): return {"loss": self.optimize(loss_fn, x, y)}
        def evaluate(self): return {"test_mse": ...}

:func:`core.runtime.loop.run_experiment` runs it, identically for every app (MLflow run, epochs,
checkpoints, resume). What a checkpoint holds is decided here: :meth:`Experiment.state_dict` saves
the model, optimizer, scheduler, estimator, sparsity plan, every ``BlackBox``'s query counter, the
RNG states, history, wall time and the app's own state, and :meth:`Experiment.load_state_dict`
restores them so that a resumed run reaches bit for bit what an uninterrupted run reaches.

Errors listed in :attr:`Experiment.stop_errors` (a query budget running out, a solver failing)
and :class:`~core.runtime.errors.TrainingDiverged` end a run cleanly: the loop keeps the last
epoch's checkpoint and reports the reason in one line.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from core.runtime.errors import TrainingDiverged, UserError


class Experiment:
    """One training run of an application: the objects it trains and the state a checkpoint restores.

    Attributes the runtime saves and restores when set: ``model``, ``optimizer``, ``scheduler``,
    ``estimator``, ``plan`` (a sparsity plan) and ``ratios``; every :class:`core.BlackBox` inside
    ``model`` or returned by :meth:`blackboxes` has its query counter saved too. Put anything else
    a resume needs in :meth:`app_state` / :meth:`load_app_state`.

    Args:
        cfg: the app's resolved config (with the shared ``optim`` and ``run`` blocks).
        resume: the checkpoint being resumed (None for a new run); use it to reuse state that is
            expensive or random to rebuild (e.g. ``resume["ratios"]`` instead of recomputing ZO-GraSP).
    """

    app: str = ""
    stop_errors: tuple[type[BaseException], ...] = ()
    plot_metric: str | None = None                 # metric plotted against epoch, queries and wall time

    def __init__(self, cfg: Any, *, resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.resume = cfg, resume
        self.model = self.optimizer = self.scheduler = self.estimator = self.plan = None
        self.ratios: dict[str, float] | None = None
        self.device: Any = None                    # the run's device (a GPU's generator is checkpointed)
        self.model_spec: dict[str, Any] | None = None
        self.epoch, self.step, self.fo_queries, self.wall = 0, 0, 0, 0.0
        self.history: list[dict[str, float]] = []
        self._lost: dict[str, int] = {}            # black-box queries spent past the last checkpoint

    # An estimator assigned at any time (a lazily built one, one rebuilt mid-run) passes through
    # ``on_estimator`` when set: a multi-process run gives every CGE its shard there.
    lazy_cge_methods: tuple[str, ...] = ()        # optim.method values whose CGE is built after the start
    on_estimator: Any = None
    # Why this app cannot run on several processes ("" = it can): e.g. a black box it asks outside the
    # estimator would be asked again by every rank, and its queries and budget counted per process.
    single_process_reason: str = ""

    @property
    def estimator(self) -> Any:
        return self.__dict__.get("_estimator")

    @estimator.setter
    def estimator(self, est: Any) -> None:
        if est is not None and self.on_estimator is not None:
            self.on_estimator(est)                 # may refuse it: then it is not assigned
        self.__dict__["_estimator"] = est

    # -- what an app supplies --------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return int(self.cfg.optim.epochs)

    def batches(self, epoch: int) -> Iterable[Any]:
        raise NotImplementedError

    def steps_per_epoch(self) -> int | None:
        return None

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step; returns metrics, ``loss`` first (logged per step as ``step_loss``)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def run_name(self) -> str:
        return self.app

    def summary(self) -> str:
        """One line printed when the run starts."""
        return f"{self.app}: {self.total_epochs} epochs"

    def tags(self) -> dict[str, Any]:
        return {}

    def blackboxes(self) -> dict[str, Any]:
        """Query-only stages whose counters a checkpoint keeps (default: those inside ``model``)."""
        from core.blackbox import BlackBox

        if self.model is None:
            return {}
        return {name or "model": m for name, m in self.model.named_modules() if isinstance(m, BlackBox)}

    def start_artifacts(self, tracker) -> None:
        """Artifacts logged once when a new run starts (e.g. sparsity ratios)."""

    def final_artifacts(self, tracker) -> None:
        """Artifacts logged when the run ends (the runtime already logs history and its plots)."""

    def app_state(self) -> dict[str, Any]:
        return {}

    def load_app_state(self, state: dict[str, Any]) -> None:
        pass

    # -- shared helpers ----------------------------------------------------------------------------
    @property
    def queries(self) -> int:
        """Per-sample model evaluations so far (the estimator's count, or the FO forwards)."""
        return int(self.estimator.queries) if self.estimator is not None else self.fo_queries

    def optimize(self, loss_fn: Callable, x=None, y=None) -> float:
        """One step of ``optimizer`` on ``loss_fn``: ZO (``estimator``) or backprop when it is None.

        Supervised ``loss_fn(model(x), y)`` or a general objective ``loss_fn(model)``. Steps the
        scheduler and the sparsity plan; a non-finite loss raises :class:`TrainingDiverged`
        before the optimizer moves.
        """
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        if self.estimator is None:
            loss = loss_fn(self.model(x), y) if x is not None else loss_fn(self.model)
            loss.backward()
            self.fo_queries += int(x.shape[0]) if x is not None else int(getattr(loss_fn, "queries", 1))
        else:
            loss = self.estimator.backward(loss_fn, x, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged (loss {float(loss)}) at step {self.step}: lower optim.lr "
                                   "or zo.mu")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.plan is not None:
            self.plan.step()
        return float(loss.detach())

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self, run_id: str | None) -> dict[str, Any]:
        from core.runtime.seeding import get_rng_state

        def sd(obj):
            return obj.state_dict() if obj is not None else None

        return {"app": self.app, "config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "step": self.step,
                "model": sd(self.model), "model_spec": self.model_spec, "optimizer": sd(self.optimizer),
                "scheduler": sd(self.scheduler), "estimator": sd(self.estimator), "plan": sd(self.plan),
                "ratios": self.ratios, "rng": get_rng_state(self.device), "history": self.history,
                "wall_time_s": self.wall,
                "fo_queries": self.fo_queries, "mlflow_run_id": run_id,
                "blackboxes": {n: {**b.query_state(), "lost": self._lost.get(n, 0)}
                               for n, b in self.blackboxes().items()},
                "app_state": self.app_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from core.runtime.seeding import set_rng_state

        try:
            for key in ("model", "optimizer", "scheduler", "estimator", "plan"):
                obj = getattr(self, key)
                if obj is not None and state.get(key) is not None:
                    obj.load_state_dict(state[key])
                elif (obj is None) != (state.get(key) is None):
                    raise ValueError(f"the checkpoint {'lacks' if obj is not None else 'has'} a {key} state")
            boxes = self.blackboxes()
            saved = state.get("blackboxes") or {}
            if set(saved) != set(boxes):
                raise ValueError(f"black boxes differ: checkpoint {sorted(saved)}, model {sorted(boxes)}")
            for name, box in boxes.items():
                # the counter continues from the checkpoint; queries spent after it (an interrupted
                # epoch, an earlier failed resume) stay spent: they come off the config's budget
                box.load_query_state(saved[name], budget=False)
                self._lost[name] = int(saved[name].get("lost", 0))
                if box.budget is not None:
                    box.budget = max(0, box.budget - self._lost[name])
            self.load_app_state(state.get("app_state") or {})
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"checkpoint does not match this config/model: {str(exc).splitlines()[0][:200]}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history, self.wall = list(state["history"]), float(state["wall_time_s"])
        self.fo_queries = int(state.get("fo_queries", 0))
        set_rng_state(state["rng"], self.device)
