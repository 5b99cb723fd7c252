"""The process group of a multi-process run: joining torchrun's group, and the error of a lost rank.

:func:`init_from_env` joins the group torchrun describes (gloo on CPU, NCCL on GPU) with a
timeout on every collective. A collective that fails or outlasts it raises :class:`RankLost`
(:func:`lost`), which names the ranks to blame when it can tell: every rank counts the
collectives it enters in torchrun's rendezvous store (:func:`arrive`), and on a timeout the ranks
with a lower count never reached the collective. :mod:`core.distributed` shards CGE on this group.
"""
from __future__ import annotations

import datetime
import os
import re
import threading
from typing import Any

import torch
import torch.distributed as dist


class RankLost(RuntimeError):
    """A collective failed or timed out: another rank died or stopped answering."""


rank_lost = False           # set once a collective of this process has failed (the run is ending)


# -- the process group ------------------------------------------------------------------------------
def torchrun_world_size() -> int:
    """``WORLD_SIZE`` of a process started by torchrun (1 for an ordinary process)."""
    if "RANK" not in os.environ:
        return 1
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_from_env(*, device: torch.device | str = "cpu", timeout: float = 300.0) -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``).

    Backend: NCCL for a CUDA ``device`` (each rank takes one GPU: :func:`rank_gpu`), gloo otherwise.
    ``timeout`` (seconds) bounds every collective: a rank that waits longer for the others raises
    :class:`RankLost`. Returns False (and does nothing) outside torchrun or for a world of 1.

    NCCL runs with blocking waits (``TORCH_NCCL_BLOCKING_WAIT=1`` unless it or ``NCCL_BLOCKING_WAIT``
    is set): a collective then returns only when it is complete, and one past the timeout raises in
    the waiting rank's own thread, where it becomes :class:`RankLost` and a clean stop. By default
    NCCL only queues the collective, and its watchdog thread ends a timed-out process with SIGABRT
    (no stop line, no blame). The ranks read every collective's result on the host at once anyway,
    so the blocking wait costs nothing here.
    """
    if torchrun_world_size() <= 1:
        return False
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds; got {timeout}")
    if dist.is_initialized():
        return True
    device = torch.device(device)
    backend = "gloo"
    if device.type == "cuda":
        backend = "nccl"
        torch.cuda.set_device(rank_gpu(device))
        if not {"TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT"} & set(os.environ):   # else the user's
            os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "1"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def rank_gpu(device: torch.device) -> int:
    """The GPU this rank takes for CUDA ``device``: GPU ``LOCAL_RANK``, one per process on a machine.

    ``cuda:N`` names one GPU, which only a machine running one process may honour (every rank on
    a machine taking GPU N would make NCCL fail on its first collective).

    Raises:
        ValueError: ``cuda:N`` with several processes on this machine, or no GPU left for this rank.
    """
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if device.index is not None and per_machine > 1:
        raise ValueError(f"device {device} names one GPU, but each of the {per_machine} processes on this "
                         "machine takes its own (process i: GPU i); give the device as 'cuda'")
    gpu = local if device.index is None else device.index
    if gpu >= count:
        raise ValueError(f"with a CUDA device each process takes one GPU, and this machine has {count}: "
                         f"local rank {local} has none (start at most {count} processes per machine)"
                         if device.index is None else f"device {device}: this machine has {count} GPUs")
    return gpu


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# -- who is missing -----------------------------------------------------------------------------------
# Every rank counts the collectives it enters in the job's rendezvous store (one ``add`` per
# collective). When one times out, the ranks whose count is below this rank's never reached it:
# those are the dead or hung ones, and the stop line names them. With two ranks, a peer that did
# reach it is named too (it stopped answering inside the collective: there is no one else); with
# more, ranks inside the collective cannot be told from healthy ones waiting there, and nobody is
# named. A failure other than a timeout (a peer's connection closed) comes at once, while healthy
# ranks may still be computing: nobody is named then; torchrun's report says which rank exited.
_arrived = 0
_STORE_WAIT = 10.0          # seconds the failure path waits for the store before naming nobody


def _key(r: int) -> str:
    """The store key of rank ``r``'s count; a torchrun restart keeps the store, so the attempt is part of it."""
    return f"deepzero/arrivals/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{r}"


def _store() -> Any:
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


def arrive() -> None:
    """Count this rank's arrival at a collective that every rank of the default group enters."""
    global _arrived
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        _arrived = _store().add(_key(dist.get_rank()), 1)
    except RankLost:                # torchrun's SIGTERM arrived meanwhile (core.runtime.ranks): stop
        raise
    except Exception:               # no usable store: the stop line then names nobody
        _arrived = 0


def counts() -> list[int] | None:
    """Every rank's count of collectives entered (None: unknown).

    The store's ``add`` has no timeout of its own, so the counts are read in a helper thread that
    this one waits for at most :data:`_STORE_WAIT` seconds (a store whose host froze names nobody).
    """
    if not _arrived or not (dist.is_available() and dist.is_initialized()):
        return None
    world, got = dist.get_world_size(), []

    def read():
        try:
            store = _store()
            got.extend(store.add(_key(r), 0) for r in range(world))    # add 0: read without waiting for the key
        except Exception:
            got.clear()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(_STORE_WAIT)
    return None if reader.is_alive() or len(got) != world else list(got)


def lost(what: str, exc: BaseException, counted: bool = True) -> RankLost:
    """The :class:`RankLost` for a collective (``what``) that failed with ``exc``; ``counted``: every
    rank enters it after :func:`arrive`, so on a timeout the ranks to blame are named when the
    counts tell (see above)."""
    global rank_lost
    rank_lost = True
    reason = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split()))[:200]   # drop gloo's source path
    seen = counts() if counted and re.search(r"tim(e|ed|ing)[ -]?out", reason, re.I) else None
    if seen is not None:
        me = dist.get_rank()
        behind = [r for r, n in enumerate(seen) if n < _arrived]
        if behind:
            names = ", ".join(map(str, behind))
            return RankLost(f"lost contact with rank{'s' if len(behind) > 1 else ''} {names}, which never reached "
                            f"{what} (dead, or hung longer than the timeout); {reason}")
        if len(seen) == 2:
            return RankLost(f"lost contact with rank {1 - me} inside {what}, which it had reached (it stopped "
                            f"answering: dead, hung, or the connection broke); {reason}")
    return RankLost(f"lost contact with another rank during {what} ({reason}): a rank died, or hangs "
                    "longer than the timeout")
