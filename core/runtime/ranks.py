"""One rank of a multi-process training run: joining torchrun's group, sharding CGE, syncing.

A process started by torchrun (``RANK``, ``WORLD_SIZE``, ... in its environment) joins the group
(:func:`start_session`); its experiment's :class:`core.CGE` gets a :class:`core.distributed.Shard`
(:meth:`Session.attach`). Rank 0 leads: only it talks to MLflow, prints and checkpoints, so the
ranks meet at every epoch's start (:meth:`Session.sync`) on a group with a long timeout, and the
step collectives wait only for the step. SIGTERM (torchrun ending the ranks after one failed)
becomes :class:`core.collectives.RankLost`, which the loop handles like any stop: the checkpoint
of the last finished epoch is kept.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any

from core.runtime.errors import UserError
from core.runtime.launch import refuse_unsharded

SYNC_ALLOWANCE = 600.0      # seconds beyond --dist-timeout the ranks wait at an epoch's start (rank 0 logs,
                            # evaluates and checkpoints meanwhile: opening an MLflow store can take a while)


@dataclass
class Session:
    """This process's place in a multi-process run (rank 0 leads: MLflow, output, checkpoints).

    ``slow`` is a gloo group with a longer timeout (``--dist-timeout`` + :data:`SYNC_ALLOWANCE`)
    for :meth:`sync`: rank 0 alone opens the MLflow run and writes checkpoints, which may take
    longer than a step's collectives are allowed to wait.
    """
    rank: int
    world: int
    slow: Any = None

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def attach(self, exp: Any) -> None:
        """Give the experiment's CGE — now, and any it builds later — a :class:`core.distributed.Shard`;
        refuse other estimators."""
        from core import CGE
        from core.distributed import Shard

        method = getattr(getattr(exp.cfg, "optim", None), "method", None)
        if exp.single_process_reason:
            raise UserError(f"{self.world} processes: {exp.single_process_reason}; run it in one process")

        def shard(est: Any) -> None:
            if not isinstance(est, CGE):
                refuse_unsharded(exp.cfg, self.world)
                raise UserError(f"{self.world} processes split CGE's coordinates; this run's estimator is "
                                f"{type(est).__name__}: use CGE, or one process")
            est.shard = Shard()

        if exp.estimator is None and method not in exp.lazy_cge_methods:
            shard(exp.estimator)                       # refused: nothing to split
        exp.on_estimator = shard
        if exp.estimator is not None:
            shard(exp.estimator)

    def sync(self) -> None:
        """Wait until every rank gets here (start of an epoch)."""
        import torch.distributed as dist

        from core import collectives as C

        C.arrive()
        try:
            dist.barrier(group=self.slow)
        except C.RankLost:                      # torchrun's SIGTERM arrived meanwhile
            raise
        except RuntimeError as exc:
            raise C.lost("the start of an epoch", exc) from None


def rank_label() -> str:
    """``"[rank r/n] "`` in a rank other than 0 of a torchrun group, else ``""``."""
    from core.collectives import torchrun_world_size

    r = os.environ.get("RANK", "0")
    return f"[rank {r}/{torchrun_world_size()}] " if r != "0" and torchrun_world_size() > 1 else ""


def start_session(args: argparse.Namespace, device: Any) -> Session | None:
    """Join torchrun's process group when this process is one of several ranks; None otherwise."""
    import atexit

    import torch.distributed as dist

    from core import collectives as C

    world = C.torchrun_world_size()
    if world == 1:
        return None
    nproc = getattr(args, "nproc", 1)
    if nproc > 1 and nproc != world:
        raise UserError(f"--nproc {nproc}, but torchrun started {world} ranks: leave --nproc out under torchrun")
    timeout = float(getattr(args, "dist_timeout", 300.0))
    try:
        C.init_from_env(device=device, timeout=timeout)
    except ValueError as exc:                       # e.g. more ranks than GPUs
        raise UserError(str(exc)) from None
    atexit.register(C.shutdown)

    def on_sigterm(signum, frame):                  # torchrun ends the other ranks when one fails
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not C.rank_lost:                         # already stopping on a failed collective
            C.rank_lost = True
            raise C.RankLost("stopped by SIGTERM (torchrun ends every rank when one fails)")

    signal.signal(signal.SIGTERM, on_sigterm)
    slow = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout + SYNC_ALLOWANCE))
    return Session(C.rank(), C.world_size(), slow)
