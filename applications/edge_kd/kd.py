"""Hinton knowledge distillation and the teacher-logits cache.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network":

    L = α·CE(z_s, y) + (1 − α)·T²·KL( softmax(z_t/T) ‖ softmax(z_s/T) )

with the KL summed over classes and averaged over the batch (``reduction='batchmean'``; the
default ``'mean'`` also divides by the number of classes, a common bug that shrinks the soft term
by K). The T² keeps the soft term's gradient scale independent of T.

Extension (for halting teacher queries): a sample without teacher logits gets α = 1 (plain
cross-entropy); with every sample's logits present this is exactly Hinton's loss.

The cache (:class:`LogitsCache`) asks the teacher for a sample's logits the first time the sample
is trained on and keeps them: the teacher is queried at most once per training sample, whatever
the number of epochs, and never runs on the device (EarlyLight, Mishra & Gupta).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def kd_loss(z_s: torch.Tensor, y: torch.Tensor, z_t: torch.Tensor, *, alpha: float, temperature: float,
            has_teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton's KD loss (see the module docstring), a scalar averaged over the batch.

    Args:
        z_s: student logits ``[B, K]``.
        y: labels ``[B]`` (int64).
        z_t: teacher logits ``[B, K]`` (rows without a teacher answer are ignored).
        alpha: weight of the cross-entropy with the labels, in [0, 1].
        temperature: T > 0.
        has_teacher: ``[B]`` bool; rows that are False use α = 1 (no soft term). None: all True.
    """
    T = temperature
    ce = F.cross_entropy(z_s, y, reduction="none")                                       # [B]
    log_p_s = F.log_softmax(z_s / T, dim=1)                                               # [B, K]
    log_p_t = F.log_softmax(z_t / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)                                 # [B]: batchmean's rows
    if has_teacher is None:
        return alpha * ce.mean() + (1 - alpha) * T * T * kl.mean()
    a = torch.where(has_teacher, torch.full_like(ce, alpha), torch.ones_like(ce))
    return (a * ce + (1 - a) * T * T * kl).mean()


class LogitsCache:
    """Teacher logits of N training samples, filled on first use; ``queries`` counts teacher samples asked.

    Args:
        n: training samples.
        num_classes: K.
    """

    def __init__(self, n: int, num_classes: int) -> None:
        self.logits = torch.zeros(n, num_classes)
        self.known = torch.zeros(n, dtype=torch.bool)

    def fetch(self, idx: torch.Tensor, x: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t [B, K], has_teacher [B])`` for samples ``idx`` with images ``x``.

        Samples not cached yet are sent to ``teacher`` in one call (None: the teacher is no longer
        asked; those rows come back with ``has_teacher`` False).
        """
        missing = ~self.known[idx]
        if teacher is not None and bool(missing.any()):
            new = idx[missing]
            out = teacher(x[missing])
            self.logits[new] = out.detach().to(self.logits.dtype).cpu()
            self.known[new] = True
        known = self.known[idx]
        return self.logits[idx].to(x.device), known.to(x.device)

    @property
    def cached(self) -> int:
        return int(self.known.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.clone(), "known": self.known.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["logits"].shape) != tuple(self.logits.shape):
            raise ValueError(f"logits cache holds {tuple(state['logits'].shape)}, this run needs "
                             f"{tuple(self.logits.shape)}")
        self.logits.copy_(state["logits"])
        self.known.copy_(state["known"])
