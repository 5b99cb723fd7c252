"""A few CGE + SGD steps on every rank of a torchrun group, or alone; each rank saves what it saw.

    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port P \
        tests/core/programs/dist_cge.py OUT

writes ``OUT.rank<r>`` (a ``torch.save`` of :func:`run_all`'s results) on every rank.
"""
import faulthandler
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from core import CGE, SparsityPlan, objective, random_ratios   # noqa: E402
from core import distributed as D                              # noqa: E402
from tests.core.toy_models import mlp, small_cnn               # noqa: E402

class Scenario(NamedTuple):
    model: str
    dtype: torch.dtype
    central: bool
    sparse: bool                    # random 50% masks, fresh every step
    objective: str                  # "supervised" or "general"
    steps: int
    exact: bool                     # Shard(exact=...)
    chunk: int | None = None        # the engine's batch of perturbations (None: its own choice)
    calibrate: bool = True
    skew: int = 0                   # rank r batches chunk + r·skew perturbations (engines that differ)


SCENARIOS = {
    "cnn-float64-sparse": Scenario("cnn", torch.float64, False, True, "supervised", 3, True),
    "mlp-float32-central": Scenario("mlp", torch.float32, True, False, "supervised", 2, True),
    "mlp-float64-general": Scenario("mlp", torch.float64, False, True, "general", 2, True),
    "cnn-float64-cut": Scenario("cnn", torch.float64, False, False, "supervised", 2, False),
    # batches of 3 perturbations, split by counts: the exact split cuts conv2's weight after whole batches
    "cnn-float32-batches": Scenario("cnn", torch.float32, False, True, "supervised", 3, True, chunk=3,
                                    calibrate=False),
    # the ranks' engines batch differently: they never agree on batch sizes, so nothing is cut
    "cnn-float64-disagree": Scenario("cnn", torch.float64, False, False, "supervised", 3, True, chunk=3,
                                     calibrate=False, skew=1),
}
B = 8


def batch(kind: str, step: int, dtype: torch.dtype, skew: int = 0):
    g = torch.Generator().manual_seed(100 + step)
    if kind == "cnn":
        x, y = torch.randn(B, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (B,), generator=g)
    else:
        x, y = torch.randn(B, 12, generator=g, dtype=dtype), torch.randint(0, 4, (B,), generator=g)
    return x, (y + skew) % (5 if kind == "cnn" else 4)


def run(name: str, shard=None) -> dict:
    kind, dtype, central, sparse, obj, steps, _, chunk, _, skew = SCENARIOS[name]
    if shard is not None and chunk is not None:
        chunk += shard.rank * skew
    torch.manual_seed(0)
    model = (small_cnn() if kind == "cnn" else mlp()).to(dtype)
    plan = SparsityPlan(model, random_ratios(model, 0.5), refresh_every=1, seed=3) if sparse else None
    zo = CGE(model, mu=1e-3, central=central, sparsity=plan, shard=shard, chunk=chunk)
    cut = []                                   # parameters split between the ranks, per step
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, grads = [], []
    for step in range(steps):
        x, y = batch(kind, step, dtype)
        opt.zero_grad()
        if obj == "general":
            loss = zo.backward(objective(lambda m: F.cross_entropy(m(x), y), queries=B))
        else:
            loss = zo.backward(F.cross_entropy, x, y)
        losses.append(loss)
        if shard is not None and shard.last_shares is not None:
            cut.append(sum(1 for share in zip(*shard.last_shares) if sum(1 for t in share if t.numel()) > 1))
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.step()
        if plan is not None:
            plan.step()
    return {"losses": torch.stack(losses), "grads": grads, "weights": model.state_dict(), "queries": zo.queries,
            "local_queries": shard.local_queries if shard else zo.queries,
            "calibration_queries": shard.calibration_queries if shard else 0,
            "costs": shard.costs if shard else None, "bytes": shard.last_bytes if shard else 0,
            "active": zo.num_active(), "cut": cut, "params": len(list(model.parameters()))}


def refusal(zo, x, y) -> str:
    """The words of the step's RanksDisagree ("" when the step went through)."""
    try:
        zo.backward(F.cross_entropy, x, y)
    except D.RanksDisagree as exc:
        return str(exc)
    return ""


def disagreement() -> str:
    """Rank r trains on labels shifted by r: every rank must refuse the step in the same words."""
    torch.manual_seed(0)
    model = mlp().double()
    zo = CGE(model, mu=1e-3, shard=D.Shard(calibrate=False))
    x, y = batch("mlp", 0, torch.float64, skew=D.rank())
    return refusal(zo, x, y)


def other_masks() -> str:
    """Rank r prunes 50% + 10·r% of the weights: the shares' lengths differ, so the step must stop
    on every rank before the values travel (gloo would abort a rank on the size mismatch)."""
    torch.manual_seed(0)
    model = mlp().double()
    plan = SparsityPlan(model, random_ratios(model, 0.5 + 0.1 * D.rank()), seed=3)
    zo = CGE(model, mu=1e-3, sparsity=plan, shard=D.Shard(calibrate=False, check=False))
    x, y = batch("mlp", 0, torch.float64)
    return refusal(zo, x, y)


def swapped_masks() -> str:
    """Two layers of equal size pruned 25% and 50% on rank 0, 50% and 25% on rank 1: as many active
    coordinates on both, split differently. Every rank must stop (deciding by its own split alone,
    one rank could go on into the values' collective and wait there, or decode them wrongly)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 12)).double()
    low, high = (0.25, 0.5) if D.rank() == 0 else (0.5, 0.25)
    plan = SparsityPlan(model, {"0.weight": low, "2.weight": high}, seed=3)
    zo = CGE(model, mu=1e-3, sparsity=plan, shard=D.Shard(calibrate=False, check=False))
    x, y = torch.randn(B, 12, dtype=torch.float64), torch.randint(0, 12, (B,))
    return refusal(zo, x, y)


def main(out: str) -> None:
    faulthandler.enable()                      # a native abort still shows where Python was
    torch.set_num_threads(1)
    D.init_from_env(timeout=120)
    try:
        results = {name: run(name, D.Shard(exact=sc.exact, calibrate=sc.calibrate)) for name, sc in SCENARIOS.items()}
        results["disagreement"] = disagreement()
        results["other_masks"] = other_masks()
        results["swapped_masks"] = swapped_masks()
        results["world"] = D.world_size()
        torch.save(results, f"{out}.rank{D.rank()}")
    except BaseException:                      # the test shows this rank's own traceback
        Path(f"{out}.rank{D.rank()}.error").write_text(traceback.format_exc())
        raise
    finally:
        D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
