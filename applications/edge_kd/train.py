"""KD of a device-designed student on the shared experiment loop, with early halting and real accounting.

Per run the app counts what halting saves: the student's training FLOPs (FlopCounterMode on the
actual steps: backprop, CGE's perturbed evaluations or MeZO's forwards, plus the validation passes a
policy needs), teacher queries (once per sample, cached) and wall time; and it measures the peak
memory of one training step (:func:`applications.edge_kd.learners.step_memory`).
Checkpoints hold the logits cache, the halting policy's state, frozen layers and counters, so a
resumed run reaches what an uninterrupted one reaches.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from applications.edge_kd import learners
from applications.edge_kd.config import KDAppConfig
from applications.edge_kd.counters import counting_flops, forward_flops
from applications.edge_kd.halting import EpochHalting, LayerFreezing, SampleDropping, TeacherHalting, make_policy
from applications.edge_kd.kd import LogitsCache, kd_loss
from applications.edge_kd.teacher import Teacher, TeacherError, load_teacher
from core.blackbox import BudgetExceeded
from core.runtime.blocks import lr_factor, sparsity_ratios
from core.runtime.cli import resolve_device
from core.runtime.data import Dataset, DataSplit, load_dataset
from core.runtime.errors import TrainingDiverged, UserError
from core.runtime.experiment import Experiment
from core.runtime.plotting import tsv
from core.runtime.seeding import seed_everything


@functools.lru_cache(maxsize=2)
def _pixels(name: str, root: str | None, image_size: int) -> Dataset:
    """A data set as [0, 1] pixels, read once per process (a sweep's cells and repeated commands share it)."""
    return load_dataset(name, root, image_size=image_size, normalize=False)


def load_data(cfg: KDAppConfig) -> tuple[Dataset, DataSplit]:
    """The data as [0, 1] pixels: ``(data with train = first n − val_size images, validation split)``."""
    data = copy.copy(_pixels(cfg.data.name, cfg.data.data_root, cfg.data.image_size))   # its splits are never written
    n = cfg.data.train_subset or len(data.train)
    if n <= cfg.data.val_size:
        raise ValueError(f"data.val_size ({cfg.data.val_size}) leaves no training images of the {n} available")
    x, y = data.train.x[:n], data.train.y[:n]
    cut = n - cfg.data.val_size
    data.train = DataSplit(x[:cut], y[:cut])
    return data, DataSplit(x[cut:], y[cut:])


def teacher_for(cfg: KDAppConfig, data: Dataset) -> Teacher:
    return load_teacher(cfg.teacher.source, data_name=cfg.data.name, input_shape=data.input_shape,
                        num_classes=data.num_classes)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits ``[N, K]`` of ``model`` in eval mode."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def design_for(cfg: KDAppConfig, data: Dataset, teacher_spec: dict[str, Any] | None, val: DataSplit):
    """``(spec, design or None, candidate)``: the student designed for the device, or the fixed depth/width.

    The design starts from the teacher's depth and width when ``teacher_spec`` is a zoo CNN's.
    """
    from applications.edge_kd.design import design_student, measure, student_spec
    from applications.edge_kd.profiles import load_profile

    profile = load_profile(cfg.device.profile)
    norm = {"mean": list(data.mean), "std": list(data.std)}
    train_bytes = None
    if cfg.student.train_on_device != "none":
        method = "fo" if cfg.student.train_on_device == "fo" else "zo-mezo"
        x = val.x[:cfg.data.batch_size]
        target = (val.y[:len(x)], torch.zeros(len(x), data.num_classes), None)
        loss = kd_objective(cfg)
        train_bytes = lambda spec: learners.step_memory(spec, method, loss, x, target, zo=cfg.zo,  # noqa: E731
                                                        optim=cfg.optim, seed=cfg.run.seed)
    if cfg.student.depth:
        spec = student_spec(cfg.student.depth, cfg.student.width, data.input_shape, data.num_classes, norm)
        return spec, None, measure(spec, data.input_shape, profile, train_bytes)
    ref = teacher_spec["kwargs"] if teacher_spec and teacher_spec["arch"] == "cnn" else None
    d0, w0 = (ref["depth"], ref["width"]) if ref else (cfg.student.base_depth, cfg.student.base_width)
    design = design_student(profile, input_shape=data.input_shape, num_classes=data.num_classes, normalize=norm,
                            ref_depth=d0, ref_width=w0, train_bytes=train_bytes)
    return design.spec, design, design.student


def kd_objective(cfg: KDAppConfig, record=None):
    """``loss(z_s, (y, z_t, has_teacher))`` for the estimators and backprop alike.

    ``record(z_s)`` is called with every output the loss sees outside ``torch.vmap``; the caller keeps
    the first of a step: the unperturbed model's for backprop, CGE and MeZO on a model with
    BatchNorm (whose step starts with an unperturbed forward), θ + μz's for MeZO otherwise.
    """
    alpha, T = cfg.kd.alpha, cfg.kd.temperature

    def loss(out: torch.Tensor, target) -> torch.Tensor:
        if record is not None and not torch._C._functorch.is_batchedtensor(out):
            record(out)
        y, z_t, has = target
        return kd_loss(out, y, z_t, alpha=alpha, temperature=T, has_teacher=has)

    return loss


def evaluation_logits(box, val: DataSplit, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's answers on the validation and test images (to score students against), or one line."""
    try:
        return box(val.x), box(data.test.x)
    except (TeacherError, BudgetExceeded) as exc:
        raise UserError(str(exc).splitlines()[0]) from None


class KDExperiment(Experiment):
    """One KD run: data, teacher (a BlackBox), the designed student, its learner and a halting policy."""

    app = "kd"
    stop_errors = (BudgetExceeded, TeacherError)
    single_process_reason = ("every rank would query the teacher for the same images, its queries and "
                             "teacher.budget counted per process")
    plot_metric = "test_accuracy"

    def __init__(self, cfg: KDAppConfig, *, resume: dict[str, Any] | None = None, data=None,
                 teacher: Teacher | None = None, spec: dict[str, Any] | None = None,
                 eval_logits: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        from core.models import from_spec, model_spec

        super().__init__(cfg, resume=resume)
        seed_everything(cfg.run.seed)
        self.device = resolve_device(cfg.run.device)
        self.data, self.val = data or load_data(cfg)
        self.teacher = teacher or teacher_for(cfg, self.data)
        t = cfg.teacher
        self.train_box = self.teacher.box(name="teacher", budget=t.budget or None, max_batch=t.max_batch or None)
        self.eval_box = self.teacher.box(name="teacher-eval", max_batch=t.max_batch or None)
        self.design = self.student = None
        if resume is not None:
            spec = resume["model_spec"]
        elif spec is None:
            spec, self.design, self.student = design_for(cfg, self.data, self.teacher.spec, self.val)
        self.model = from_spec(spec).to(self.device)
        self.model_spec = model_spec(self.model)
        self.units = learners.units(self.model)
        self.forward_flops = forward_flops(self.model, self.data.input_shape)
        saved = (resume or {}).get("app_state") or {}
        if saved:
            self.val_logits, self.test_logits = saved["val_logits"], saved["test_logits"]
        elif eval_logits is not None:                     # asked once for several runs (kd run)
            self.val_logits, self.test_logits = eval_logits
        else:
            self.val_logits, self.test_logits = evaluation_logits(self.eval_box, self.val, self.data)
        self.teacher_val_accuracy = float((self.val_logits.argmax(1) == self.val.y).float().mean())
        self.teacher_test_accuracy = float((self.test_logits.argmax(1) == self.data.test.y).float().mean())
        n = len(self.data.train)
        self._steps = math.ceil(n / cfg.data.batch_size)
        method = cfg.optim.method
        self.progress = 0.0                              # epochs done, fractional (drives the lr schedule)
        if method in ("zo-cge", "zo-rge"):
            self.ratios = resume.get("ratios") if resume is not None else self._ratios()
        self.plan = learners.make_plan(cfg.zo, self.model, method, self.ratios,
                                       refresh_steps=cfg.zo.refresh_epochs * self._steps, seed=cfg.run.seed)
        self.estimator = learners.make_estimator(cfg.zo, method, self.model, plan=self.plan, seed=cfg.run.seed)
        self.optimizer, self.scheduler = learners.make_optimizer(cfg.optim, self.model, method, self._lr_scale)
        self.cache = LogitsCache(n, self.data.num_classes)
        self.policy = make_policy(cfg.halting, n_train=n, units=len(self.units),
                                  teacher_accuracy=self.teacher_val_accuracy)
        self.train_flops, self.step_flops, self.measured = 0.0, 0.0, 0
        self.halted_epoch, self.halt_reason, self.frozen = 0, "", 0
        self.previous = self._unit_values()
        self._visit = 0

    # -- helpers ---------------------------------------------------------------------------------
    def _ratios(self) -> dict[str, float] | None:
        k = self.cfg.zo.grasp_per_class * self.data.num_classes
        x, y = self.data.train.x[:k].to(self.device), self.data.train.y[:k].to(self.device)
        return sparsity_ratios(self.cfg.zo, self.model, F.cross_entropy, x, y, seed=self.cfg.run.seed)

    def _lr_scale(self) -> float:
        o = self.cfg.optim
        return lr_factor(self.progress, o.epochs, o.warmup_epochs)

    def _unit_values(self) -> list[torch.Tensor]:
        return [torch.cat([p.detach().reshape(-1) for p in u]).clone() for u in self.units]

    def _kept(self) -> torch.Tensor:
        n = len(self.data.train)
        return self.policy.kept if isinstance(self.policy, SampleDropping) else torch.ones(n, dtype=torch.bool)

    def _freeze(self, k: int) -> None:
        """Freeze the first k units: no gradients (backprop) and out of the perturbed dimension (ZO)."""
        for unit in self.units[:k]:
            for p in unit:
                p.requires_grad_(False)
        self.frozen = k
        if self.estimator is not None:
            state = self.estimator.state_dict()
            self.estimator = learners.make_estimator(self.cfg.zo, self.cfg.optim.method, self.model, plan=self.plan,
                                                     seed=self.cfg.run.seed)
            self.estimator.load_state_dict(state)
        self.measured = 0                               # the step's FLOPs change: count them again

    # -- the loop's parts ------------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return self.halted_epoch or int(self.cfg.optim.epochs)

    def batches(self, epoch: int):
        order = self._kept().nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + epoch)
        order = order[torch.randperm(len(order), generator=gen)]
        self._epoch_batches = max(1, math.ceil(len(order) / self.cfg.data.batch_size))
        self._visit = 0
        return list(order.split(self.cfg.data.batch_size))

    def steps_per_epoch(self) -> int:
        return math.ceil(int(self._kept().sum()) / self.cfg.data.batch_size)

    def train_step(self, idx: torch.Tensor) -> dict[str, float]:
        x, y = self.data.train.x[idx].to(self.device), self.data.train.y[idx].to(self.device)
        stopped = isinstance(self.policy, TeacherHalting) and self.policy.halted
        z_t, has = self.cache.fetch(idx, x, None if stopped else self.train_box)
        seen: list[torch.Tensor] = []
        loss_fn = kd_objective(self.cfg, record=lambda out: seen.append(out.detach()) if not seen else None)
        self.progress = self.epoch + self._visit / self._epoch_batches
        self._visit += 1
        if self.measured < 2:                          # count this step's FLOPs for real
            with counting_flops() as flops:
                loss = self._update(loss_fn, x, (y, z_t, has))
            self.step_flops, self.measured = flops() / len(idx), self.measured + 1
            self.train_flops += flops()
        else:
            loss = self._update(loss_fn, x, (y, z_t, has))
            self.train_flops += self.step_flops * len(idx)
        out = seen[0] if seen else None
        if out is not None and isinstance(self.policy, SampleDropping):
            self.policy.decide(idx, out.softmax(1), y)
        if out is not None and isinstance(self.policy, TeacherHalting) and not stopped and bool(has.any()):
            self.policy.decide((out.argmax(1) == z_t.argmax(1))[has])
        return {"loss": loss}

    def _update(self, loss_fn, x, target) -> float:
        if self.cfg.optim.method != "zo-mezo":
            return self.optimize(loss_fn, x, target)
        loss = self.estimator.estimate(loss_fn, x, target)      # MeZO: forwards only, in-place update
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged (loss {float(loss)}) at step {self.step}: lower optim.lr "
                                   "or zo.mu")
        self.estimator.step(self.cfg.optim.lr * self._lr_scale(), self.cfg.optim.weight_decay)
        return float(loss)

    def evaluate(self) -> dict[str, float]:
        bs = self.cfg.data.test_batch_size
        val = predict(self.model, self.val.x.to(self.device), bs).cpu()
        test = predict(self.model, self.data.test.x.to(self.device), bs).cpu()
        val_acc = float((val.argmax(1) == self.val.y).float().mean())
        if isinstance(self.policy, EpochHalting):      # the validation pass is the policy's cost
            self.train_flops += self.forward_flops * len(self.val)
            if self.policy.decide(val_acc):
                self.halted_epoch, self.halt_reason = self.epoch + 1, self.policy.reason
        if isinstance(self.policy, LayerFreezing):
            now = self._unit_values()
            changes = [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(now, self.previous)]
            self.previous = now
            k = self.policy.decide(changes)
            if k > self.frozen:
                self._freeze(k)
        return {"test_accuracy": float((test.argmax(1) == self.data.test.y).float().mean()),
                "test_loss": float(F.cross_entropy(test, self.data.test.y)), "val_accuracy": val_acc,
                "val_agreement": float((val.argmax(1) == self.val_logits.argmax(1)).float().mean()),
                "train_flops": self.train_flops, "teacher_queries": float(self.train_box.queries),
                "active_samples": float(self._kept().sum()), "frozen_units": float(self.frozen),
                "teacher_stopped": float(isinstance(self.policy, TeacherHalting) and self.policy.halted)}

    # -- run identity, artifacts, state ----------------------------------------------------------
    def run_name(self) -> str:
        return f"{self.cfg.optim.method}-{self.cfg.halting.policy}"

    def summary(self) -> str:
        kw = self.model_spec["kwargs"]
        return (f"KD {self.cfg.optim.method}, halting {self.cfg.halting.policy}, student cnn depth {kw['depth']} "
                f"width {kw['width']} ({sum(p.numel() for p in self.model.parameters())} params), teacher "
                f"{self.teacher.description} (test accuracy {self.teacher_test_accuracy:.4f}), "
                f"{self.cfg.optim.epochs} epochs")

    def tags(self) -> dict[str, Any]:
        kw = self.model_spec["kwargs"]
        return {"student": f"cnn-d{kw['depth']}-w{kw['width']}", "device_profile": self.cfg.device.profile,
                "halting": self.cfg.halting.policy, "teacher": self.teacher.description}

    def blackboxes(self) -> dict[str, Any]:
        return {"teacher": self.train_box, "teacher-eval": self.eval_box}

    def step_memory(self) -> int:
        """Measured peak bytes of one training step of this run's student and method (fp32)."""
        b = self.cfg.data.batch_size
        x = self.val.x[:b]
        target = (self.val.y[:b], self.val_logits[:b], None)
        return learners.step_memory(self.model_spec, self.cfg.optim.method, kd_objective(self.cfg), x, target,
                                    zo=self.cfg.zo, optim=self.cfg.optim, seed=self.cfg.run.seed)

    def start_artifacts(self, tracker) -> None:
        from applications.edge_kd.design import constraint_row, format_table

        self.peak_memory = self.step_memory()
        tracker.log_metrics({"peak_step_memory_bytes": self.peak_memory, "teacher_test_accuracy":
                             self.teacher_test_accuracy, "teacher_val_accuracy": self.teacher_val_accuracy,
                             "student_params": sum(p.numel() for p in self.model.parameters()),
                             "student_forward_flops": self.forward_flops})
        if self.student is not None:
            rows = [constraint_row(k, v, self.student.budgets[k]) for k, v in self.student.values.items()]
            tracker.log_text(format_table(rows), "design/constraints.txt")
            tracker.log_text(tsv(rows), "design/constraints.tsv")

    def final_artifacts(self, tracker) -> None:
        tracker.set_tags({"halted_epoch": self.halted_epoch or "", "halt_reason": self.halt_reason})

    def app_state(self) -> dict[str, Any]:
        return {"cache": self.cache.state_dict(), "val_logits": self.val_logits, "test_logits": self.test_logits,
                "policy": self.policy.state_dict() if self.policy is not None else None,
                "train_flops": self.train_flops, "step_flops": self.step_flops, "measured": self.measured,
                "halted_epoch": self.halted_epoch, "halt_reason": self.halt_reason, "frozen": self.frozen,
                "previous": self.previous}

    def load_app_state(self, state: dict[str, Any]) -> None:
        self.cache.load_state_dict(state["cache"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        self.train_flops, self.step_flops = float(state["train_flops"]), float(state["step_flops"])
        self.halted_epoch, self.halt_reason = int(state["halted_epoch"]), str(state["halt_reason"])
        self.previous = [t.to(self.device).clone() for t in state["previous"]]
        if int(state["frozen"]):
            self._freeze(int(state["frozen"]))
        self.measured = int(state["measured"])
