"""Distributed CGE on ``torch.distributed``: each rank estimates a share of the coordinates.

CGE's coordinates are independent, so R processes can split them (DeepZero, Chen et al. 2024,
"forward parallelization"). Per step, on every rank::

    active  = the step's active coordinates          (same sparsity plan and seed on every rank)
    shares  = split(active, costs)                    (at batch boundaries, balanced by measured cost)
    g_mine  = FastCGE on shares[rank]                 (its own unperturbed forward, its own queries)
    checks  = all-gather(loss, active set, split)     (40 bytes per rank: stop before the values if they differ)
    g       = all-gather(g_mine)                      (shard values only)
    optimizer.step()                                  (the same update of the same weights everywhere)

Deviation from the public DeepZero code, which ships every parameter from a master to its RPC
workers every step: the weights never travel. Every rank starts from the same seed, sees the
same batch and applies the same update to the same gathered gradient, so the weights stay equal
bit for bit; only the d estimated values (plus 40 bytes of checks per rank) move per step. The
shares differ in length (a cost split gives a rank more cheap coordinates or fewer dear ones), and
gloo's all_gather needs equal lengths, so the values travel by one ``all_to_all_single``
(padding to the longest share would send up to R times the bytes); the checks go first, because
ranks whose active sets differ would expect other lengths, and gloo aborts on a size mismatch.

Exactness: by default a parameter is cut between ranks only where one process's engine starts
a new batch of perturbations (a multiple of that parameter's batch size, counted from its first
active coordinate: :meth:`core.CGE.cut_units`), so every rank evaluates the same batches as one
process and the gradient equals the one-process gradient bit for bit (tested in float64 and
float32 on CPU). The ranks report their batch sizes with each step's gathered checks; until all
reported the same for an input's shape (the first step with it, or ranks whose engines batch
differently) parameters stay whole, which is exact too. ``Shard(exact=False)`` cuts anywhere
(contiguous runs of equal cost): equal to one process within rounding (a coordinate's loss is
then computed in another batch of perturbations).

Costs: on the first step the split balances coordinate counts; each rank warms up on one
coordinate per parameter, then estimates its share parameter by parameter, timed (one engine call
per parameter, buffers restored in between; the extra evaluations are counted as queries); the
per-coordinate cost of each parameter, pooled over the ranks, then decides every later split
(:func:`core.sharding.split`: runs cut at the engine's batch boundaries once every rank reported the same
batch sizes for the input, or whole parameters, largest first to the least loaded rank, whichever
is better balanced). General and batched objectives cost the same per coordinate and are split by
counts.

Checks, every step, from the gathered checks (before the values travel): all ranks must report
the same split of the coordinates, and (``check=True``) the same unperturbed loss (bit for bit on
CPU; within 1e-3 relative on CUDA, whose kernels may round differently) and the same active set;
otherwise every rank raises :class:`RanksDisagree`. A collective that fails or outlasts the
process group's timeout (a rank died or hangs) raises :class:`RankLost`, which names the ranks that
never reached that collective when it can tell (each rank counts the collectives it enters in
torchrun's store; see :mod:`core.collectives`).
"""
from __future__ import annotations

import time
import zlib
from typing import Any

import torch
import torch.distributed as dist

from core.collectives import arrive, lost
from core.collectives import (RankLost, init_from_env, rank, shutdown,  # noqa: F401  (the group's API, kept here too)
                              torchrun_world_size, world_size)
from core.sharding import split

_P = 1_000_000_007          # modulus of the active-set fingerprint
_META = 5                   # int64 words of checks per rank and step: loss, queries, active set, batches, split


class RanksDisagree(RuntimeError):
    """The ranks evaluated different losses or active sets (different data, weights or seeds)."""


# -- what the ranks compare before the values travel --------------------------------------------------
def _call_key(call: Any) -> tuple:
    """What the engine's batch sizes depend on that every rank sees alike: the objective's kind and
    the input's shape and dtype."""
    x = getattr(call, "x", None)
    return (call.kind, tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else (call.kind,)


def _digest(obj: Any) -> int:
    """A number that differs, almost surely, between ranks holding different ``obj`` (plain Python values)."""
    return zlib.crc32(repr(obj).encode())


def _batches_print(key: tuple, units: list[int] | None) -> int:
    """A number that differs between ranks reporting different batch sizes for the same input (0: none)."""
    return 0 if units is None else _digest((key, list(units))) + 1


def fingerprint(active: list[torch.Tensor]) -> torch.Tensor:
    """An int64 summary of the active set (counts and index sums per parameter), for agreement checks."""
    fp = torch.zeros((), dtype=torch.int64, device=active[0].device if active else "cpu")
    for i, idx in enumerate(active):
        idx = idx.to(torch.int64)
        term = idx.numel() * 1_000_003 + (idx % _P).sum() + (idx * idx % _P).sum()
        fp = (fp * 31 + (i + 1) * (term % _P)) % (1 << 61)
    return fp


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


# -- the shard --------------------------------------------------------------------------------------
class Shard:
    """This rank's share of a :class:`core.CGE` step, and the collectives that complete it.

    Pass it to the estimator, ``CGE(model, shard=Shard())``, on every rank of an initialised
    process group (:func:`init_from_env`). ``zo.queries`` then counts the queries of all ranks
    (the same number everywhere; a checkpoint of any rank resumes on any number of ranks), and
    ``shard.local_queries`` those of this rank.

    Args:
        group: the process group (default: the world).
        calibrate: time the first step per parameter and split later steps by cost (else: by
            coordinate counts).
        check: compare the ranks' unperturbed losses and active sets every step.
        exact: cut a parameter between ranks only at the engine's batch boundaries (bit for bit
            the one-process gradient); False cuts anywhere (equal within rounding).

    Attributes:
        costs: seconds per coordinate of each owned parameter once calibrated, else None.
        calibration_queries: extra queries the calibration step spent, summed over ranks.
        last_bytes: bytes this rank sent in the last step's collectives: its share (plus 40 bytes of
            checks) to each of the other ranks.
        last_compute_s, last_wait_s: this rank's seconds estimating its share, and in the step's
            two collectives (mostly waiting for slower ranks), in the last step.
        last_shares: the last step's split, ``last_shares[r][i]`` the coordinates of parameter i
            that rank r estimated (None before the first step).
    """

    def __init__(self, *, group: Any = None, calibrate: bool = True, check: bool = True,
                 exact: bool = True) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Shard needs an initialised torch.distributed process group: launch with torchrun "
                             "and call core.distributed.init_from_env() first")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.calibrate, self.check, self.exact = calibrate, check, exact
        self.costs: list[float] | None = None
        self.local_queries = 0
        self.calibration_queries = 0
        self.last_bytes = 0
        self.last_compute_s = self.last_wait_s = 0.0
        self.last_shares: list[list[torch.Tensor]] | None = None
        self._agreed: dict[tuple, list[int] | None] = {}    # input kind/shape -> batch sizes every rank reported
        # The last collective's tensors. gloo's worker thread lets go of a finished collective a moment
        # after the caller resumes; if it held the last reference to a tensor Python had dropped, it must
        # take the GIL to free it, and while the interpreter shuts down that aborts the process ("terminate
        # called without an active exception"; the group can outlive destroy_process_group once
        # torch._dynamo is imported, e.g. by an optimizer). Held here, Python frees them itself.
        self._held: tuple = ()

    # -- one step -----------------------------------------------------------------------------------
    def backward(self, zo: Any, call: Any, active: list[torch.Tensor]) -> torch.Tensor:
        """Estimate this rank's share, gather all shares into ``p.grad``; return the unperturbed loss."""
        if self.world == 1:
            loss0, grads = zo._estimate(call, active)
            zo._set_grads(grads)
            return loss0
        before, start = zo.queries, time.perf_counter()
        key = _call_key(call)
        if self.costs is None and self.calibrate and call.kind == "supervised":
            shares = split(active, self.world, whole=self.exact)
            loss0, grads = self._calibrated(zo, call, shares)
        else:
            units = self._agreed.get(key) if self.exact else None
            shares = split(active, self.world, self.costs, whole=self.exact, units=units)
            loss0, grads = zo._estimate(call, shares[self.rank])
        spent = zo.queries - before
        self.last_shares = shares
        if grads and grads[0].device.type == "cuda":
            torch.cuda.synchronize(grads[0].device)     # the share's kernels done: compute time, not wait
        self.last_compute_s = time.perf_counter() - start
        units = zo.cut_units(call) if self.exact else None       # planned now for this input
        full, total = self._gather(zo, shares, grads, loss0, spent, active, (key, units))
        self.local_queries += spent
        zo.queries = before + total
        zo._set_grads(full)
        return loss0

    def _calibrated(self, zo: Any, call: Any, shares: list[list[torch.Tensor]]):
        """The first step, one parameter at a time, timed; sets :attr:`costs` from all ranks' timings.

        A call on one coordinate of each parameter runs first: it warms every path the timings
        take (compiled loops, index maps, caches), which would otherwise be charged to whichever
        parameter ran first. The timed calls together give the step's estimate.
        """
        mine = shares[self.rank]
        empty = [idx[:0] for idx in mine]
        buffers = [(b, b.detach().clone()) for b in zo.model.buffers()]

        def run(part: list[torch.Tensor]):
            with torch.no_grad():
                for b, v in buffers:        # every call starts from the step's buffers (BN statistics)
                    b.copy_(v)
            sync = mine[0].device.type == "cuda" and torch.cuda.synchronize
            t = time.perf_counter()
            out = zo._estimate(call, part)
            if sync:
                sync()
            return out, time.perf_counter() - t

        before = zo.queries
        run([idx[:1] for idx in mine])                # warm-up
        (loss0, grads), overhead = run(empty)         # one unperturbed forward; its loss is the step's
        extra = zo.queries - before - call.per_eval   # what one call of the whole share would not spend
        seconds = []
        for i, idx in enumerate(mine):
            if idx.numel():
                (_, g), dt = run([idx if j == i else e for j, e in enumerate(empty)])
                grads[i] = g[i]
                extra += call.per_eval                # each timed call's own unperturbed forward
                seconds.append(max(dt - overhead, 0.05 * dt))
            else:
                seconds.append(0.0)
        rows = [[float(idx.numel()), s] for idx, s in zip(mine, seconds)] + [[float(extra), 0.0]]
        pooled = self._all_gather(torch.tensor(rows, dtype=torch.float64, device=mine[0].device),
                                  "the cost calibration")
        n = sum(t[:-1, 0].cpu() for t in pooled)
        s = sum(t[:-1, 1].cpu() for t in pooled)
        measured = [float(si / ni) for si, ni in zip(s.tolist(), n.tolist()) if ni > 0]
        mean = sum(measured) / len(measured) if measured else 1.0
        self.costs = [float(si / ni) if ni > 0 else mean for si, ni in zip(s.tolist(), n.tolist())]
        self.calibration_queries += int(sum(float(t[-1, 0]) for t in pooled))
        return loss0, grads

    # -- the collective -------------------------------------------------------------------------------
    def _all_gather(self, t: torch.Tensor, what: str, sizes: list[int] | None = None) -> list[torch.Tensor]:
        """Every rank's ``t``. With ``sizes`` (the lengths of the ranks' 1-D tensors) the shares may
        differ in length: gloo's all_gather needs equal sizes, and padding to the largest share would
        send up to R times the bytes, so uneven shares travel by one ``all_to_all_single`` instead.
        """
        counted = self.group in (None, dist.group.WORLD)
        if counted:
            arrive()
        try:
            if sizes is None:
                out = [torch.empty_like(t) for _ in range(self.world)]
                dist.all_gather(out, t, group=self.group)
                self._held = (t, out)
            else:
                flat, sent = torch.empty(sum(sizes), dtype=t.dtype, device=t.device), t.repeat(self.world)
                dist.all_to_all_single(flat, sent, output_split_sizes=sizes,
                                       input_split_sizes=[sizes[self.rank]] * self.world, group=self.group)
                self._held = (sent, flat)
                out = list(flat.split(sizes))
        except RankLost:                   # torchrun's SIGTERM arrived meanwhile (core.runtime.ranks)
            raise
        except RuntimeError as exc:        # gloo/NCCL errors, DistBackendError: a peer died or timed out
            raise lost(what, exc, counted) from None
        return out

    def _gather(self, zo: Any, shares, grads, loss0: torch.Tensor, spent: int, active, batches):
        """All shares' values into full zero-filled gradients; returns (gradients, queries of all ranks).

        Two collectives: the ranks' checks (:data:`_META` words each, equal sizes), then the shares.
        Every rank decodes the others' shares by its own split, so ranks whose splits differ (other
        active sets or dtypes) must all stop before the shares travel (gloo aborts the process on a
        size mismatch, and equal sizes would decode into the wrong coordinates): each rank's checks
        carry a print of its whole split's layout, and only equal prints on every rank go on.

        ``batches``: (input key, this rank's engine batch sizes for it). When every rank reports the
        same, later steps with that input may cut parameters at those batch boundaries: the split
        depends only on what all ranks agreed, never on one rank's engine (which may batch
        differently on another machine, e.g. without Numba)."""
        params = [p for _, p in zo.named_params]
        device = params[0].device
        sizes = [p.element_size() for p in params]
        layout = [[int(idx.numel()) * s for idx, s in zip(share, sizes)] for share in shares]   # bytes [rank][param]
        lengths = [sum(row) for row in layout]
        payload = torch.cat([_bytes(g[idx]) for g, idx in zip(grads, shares[self.rank])])
        meta = torch.stack([loss0.detach().to(device, torch.float64).reshape(()).view(torch.int64),
                            torch.tensor(spent, dtype=torch.int64, device=device),
                            fingerprint(active).to(device),
                            torch.tensor(_batches_print(*batches), dtype=torch.int64, device=device),
                            torch.tensor(_digest(layout), dtype=torch.int64, device=device)])
        self.last_bytes = (self.world - 1) * (8 * _META + int(payload.numel()))
        start = time.perf_counter()
        metas = torch.stack(self._all_gather(meta, "the step's checks")).cpu()     # [world, _META]
        if self.check:
            self._agree(metas)
        if not bool((metas[:, 4] == metas[0, 4]).all()):        # decided alike on every rank
            raise RanksDisagree("the ranks split the coordinates differently (other active sets or dtypes): every "
                                "rank needs the same model, sparsity plan and seed")
        gathered = self._all_gather(payload, "the gradient all-gather", lengths)
        self.last_wait_s = time.perf_counter() - start
        full = [torch.zeros(p.numel(), dtype=p.dtype, device=device) for p in params]
        for r, b in enumerate(gathered):
            at = 0
            for i, (idx, p) in enumerate(zip(shares[r], params)):
                nb = int(idx.numel()) * sizes[i]
                if nb:
                    full[i][idx] = b[at:at + nb].clone().view(p.dtype)
                at += nb
        key, units = batches
        if units is not None and bool((metas[:, 3] == metas[0, 3]).all()):
            self._agreed[key] = units
        else:
            self._agreed.pop(key, None)
        return full, int(metas[:, 1].sum())

    def _agree(self, metas: torch.Tensor) -> None:
        losses = metas[:, 0].clone().view(torch.float64)
        if not bool((metas[:, 2] == metas[0, 2]).all()):
            raise RanksDisagree("the ranks estimated different active sets: every rank needs the same sparsity "
                                "plan and seed")
        if dist.get_backend(self.group) == "nccl":
            close = ((losses - losses[0]).abs() <= 1e-3 * losses[0].abs().clamp(min=1.0)) & losses.isfinite() & \
                losses[0].isfinite()
        else:
            close = losses == losses[0]
        close |= (losses == losses[0]) | (losses.isnan() & losses[0].isnan())   # ±inf, NaN: the loop reports divergence
        if not bool(close.all()):
            raise RanksDisagree(f"the ranks disagree on the unperturbed loss ({', '.join(f'{v:.9g}' for v in losses)}"
                                "): every rank needs the same weights, batch and seed")
