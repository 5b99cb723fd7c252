"""Early halting: four ways to stop spending the device's compute and the teacher's queries.

EarlyLight (Mishra & Gupta) halts the student's training early to cut its FLOPs and time; the
exact criterion is not public. Each policy here is a small object with one decision method, its
state saved in checkpoints (``state_dict`` / ``load_state_dict``) so a resumed run decides the same:

- :class:`EpochHalting` (``plateau``): end training when the validation accuracy reaches
  ρ·(the teacher's), or has not improved by ``min_delta`` for ``patience`` epochs.
- :class:`SampleDropping` (``drop``): leave out of later epochs every training sample the student
  has learned — true class predicted with probability ≥ ``confidence`` on ``patience`` visits in a row.
- :class:`TeacherHalting` (``teacher``): stop querying the teacher once the student is mature —
  it agrees with the teacher on ≥ ``agreement`` of the last ``window`` training samples; samples
  not cached by then are trained on their labels alone.
- :class:`LayerFreezing` (``freeze``): freeze the leading layers whose weights moved by less than
  ``tol`` (relative, per epoch) for ``patience`` epochs; under backprop it skips their gradients,
  under ZO it also shrinks the perturbed dimension.
"""
from __future__ import annotations

from typing import Any

import torch

POLICIES = ("none", "plateau", "drop", "teacher", "freeze")


class EpochHalting:
    """Halt at an epoch's end on a validation plateau or at ρ·teacher accuracy.

    Args:
        patience: epochs without an improvement of more than ``min_delta`` that end training.
        min_delta: the improvement in validation accuracy (0–1) that counts.
        rho: halt once ``val_accuracy >= rho * teacher_accuracy`` (0 disables this criterion).
        teacher_accuracy: the teacher's accuracy on the same validation samples.
    """

    def __init__(self, *, patience: int, min_delta: float, rho: float, teacher_accuracy: float) -> None:
        self.patience, self.min_delta, self.rho, self.teacher_accuracy = patience, min_delta, rho, teacher_accuracy
        self.best, self.stale, self.reason = float("-inf"), 0, ""

    def decide(self, val_accuracy: float) -> bool:
        """Record one epoch's validation accuracy; True when training should end now."""
        if self.rho > 0 and val_accuracy >= self.rho * self.teacher_accuracy:
            self.reason = (f"validation accuracy {val_accuracy:.4f} >= {self.rho:g} x teacher "
                           f"{self.teacher_accuracy:.4f}")
            return True
        if val_accuracy > self.best + self.min_delta:
            self.best, self.stale = val_accuracy, 0
        else:
            self.stale += 1
        if self.stale >= self.patience:
            self.reason = f"no validation improvement > {self.min_delta:g} for {self.stale} epochs"
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.stale, self.reason = float(state["best"]), int(state["stale"]), str(state["reason"])


class SampleDropping:
    """Drop the samples the student has learned from later epochs.

    Args:
        n: training samples.
        confidence: a visit counts as learned when the student gives the true class at least this
            probability (and predicts it).
        patience: consecutive learned visits that drop a sample.
        max_fraction: never drop more than this fraction of the samples (the rest keep training).
    """

    def __init__(self, n: int, *, confidence: float, patience: int, max_fraction: float) -> None:
        self.confidence, self.patience, self.max_fraction = confidence, patience, max_fraction
        self.streak = torch.zeros(n, dtype=torch.int64)
        self.kept = torch.ones(n, dtype=torch.bool)

    def decide(self, idx: torch.Tensor, probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Record one visit of samples ``idx`` (student probabilities ``[B, K]``, labels ``[B]``).

        Returns the samples among ``idx`` dropped by this visit (they leave from the next epoch on).
        """
        learned = (probs.argmax(1) == y) & (probs.gather(1, y.view(-1, 1)).squeeze(1) >= self.confidence)
        idx = idx.cpu()
        self.streak[idx] = torch.where(learned.cpu(), self.streak[idx] + 1, torch.zeros_like(self.streak[idx]))
        ready = idx[(self.streak[idx] >= self.patience) & self.kept[idx]]
        room = int(self.max_fraction * len(self.kept)) - int((~self.kept).sum())
        dropped = ready[:max(0, room)]
        self.kept[dropped] = False
        return dropped

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak.clone(), "kept": self.kept.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak.copy_(state["streak"])
        self.kept.copy_(state["kept"])


class TeacherHalting:
    """Stop querying the teacher once the student agrees with it often enough on recent samples.

    Args:
        agreement: the fraction of the last ``window`` samples (with teacher logits) on which the
            student's and the teacher's predicted classes must agree.
        window: how many recent samples the agreement is measured on; nothing is decided before
            ``window`` samples were seen.
    """

    def __init__(self, *, agreement: float, window: int) -> None:
        self.agreement, self.window = agreement, window
        self.recent = torch.zeros(0, dtype=torch.bool)
        self.halted = False

    def decide(self, agree: torch.Tensor) -> bool:
        """Record student–teacher agreement ``[B]`` of one step; True once queries should stop (and after)."""
        if not self.halted:
            self.recent = torch.cat([self.recent, agree.cpu().bool()])[-self.window:]
            self.halted = len(self.recent) >= self.window and float(self.recent.float().mean()) >= self.agreement
        return self.halted

    def state_dict(self) -> dict[str, Any]:
        return {"recent": self.recent.clone(), "halted": self.halted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent, self.halted = state["recent"].clone(), bool(state["halted"])


class LayerFreezing:
    """Freeze converged leading layers (units): a prefix, so backprop stops before them.

    Args:
        units: number of layers (units) of the student, in forward order.
        tol: a unit has converged for an epoch when ‖θ_e − θ_{e−1}‖ / ‖θ_{e−1}‖ < tol.
        patience: epochs in a row below ``tol`` before the unit may freeze.
        keep: units at the end that always train (the classifier head by default).
    """

    def __init__(self, units: int, *, tol: float, patience: int, keep: int = 1) -> None:
        self.tol, self.patience, self.keep = tol, patience, keep
        self.calm = [0] * units
        self.frozen = 0

    def decide(self, changes: list[float]) -> int:
        """Record each unit's relative change over the last epoch; returns how many leading units are frozen."""
        if len(changes) != len(self.calm):
            raise ValueError(f"expected {len(self.calm)} per-unit changes; got {len(changes)}")
        self.calm = [c + 1 if change < self.tol else 0 for c, change in zip(self.calm, changes)]
        limit = len(self.calm) - self.keep
        while self.frozen < limit and self.calm[self.frozen] >= self.patience:
            self.frozen += 1
        return self.frozen

    def state_dict(self) -> dict[str, Any]:
        return {"calm": list(self.calm), "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calm, self.frozen = [int(c) for c in state["calm"]], int(state["frozen"])


def make_policy(cfg, *, n_train: int, units: int, teacher_accuracy: float):
    """The policy ``cfg.policy`` names (a :class:`~applications.edge_kd.config.HaltingConfig`); None for ``none``."""
    if cfg.policy == "plateau":
        return EpochHalting(patience=cfg.patience, min_delta=cfg.min_delta, rho=cfg.rho,
                            teacher_accuracy=teacher_accuracy)
    if cfg.policy == "drop":
        return SampleDropping(n_train, confidence=cfg.drop_confidence, patience=cfg.drop_patience,
                              max_fraction=cfg.drop_max_fraction)
    if cfg.policy == "teacher":
        return TeacherHalting(agreement=cfg.teacher_agreement, window=cfg.teacher_window)
    if cfg.policy == "freeze":
        return LayerFreezing(units, tol=cfg.freeze_tol, patience=cfg.freeze_patience)
    return None
