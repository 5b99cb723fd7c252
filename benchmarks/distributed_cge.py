"""Distributed CGE: time per step against the number of ranks, and the bytes a step moves.

The paper's small CNN (depth 3, width 18, 6,346 parameters) on a 1×28×28 batch of 64, train-mode
BN, forward differences, dense and 90% sparse (random masks); SGD steps. ``ranks = 1`` is the
ordinary :class:`core.CGE` in this process; ``ranks = R > 1`` runs R gloo processes on 127.0.0.1
under torchrun (this file is the worker) with ``CGE(..., shard=Shard())``. The first step calibrates
the split and is not timed. ``identical`` says whether the R-rank weights after the steps equal
the one-process weights bit for bit. ``CPU s (all)`` adds the ranks' CPU seconds per step: on a
shared or busy core it shows the cost of distributing (each rank's own unperturbed forward, the
collective) independently of how the scheduler divides the core.

Bytes per step: ours are the collectives that gather the shares (:attr:`Shard.last_bytes`:
every rank sends its share plus 40 bytes of agreement checks to the R − 1 others). The
DeepZero comparison is their RPC design: a master sends all parameters to the R − 1 workers every
step and each worker returns its share of the gradient. ResNet-20 (269,722 parameters, 90% sparse
with BN and biases dense) is counted from the split alone (no timing: a CGE step of it takes
minutes on one core).

On a machine with one effective core R ranks share that core, so R = 2 cannot be faster here;
the table reports it as measured. With CUDA, the GPU rows use NCCL with one GPU per rank (as many
ranks as GPUs, at most 2); without CUDA they are skipped.

    python -m benchmarks.distributed_cge [--steps 4] [--ranks 1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cnn3-dense": 0.0, "cnn3-sparse90": 0.9}      # name -> sparsity of conv/linear weights
B = 64


def build(sparsity: float, device: str):
    from core import SparsityPlan, random_ratios
    from core.models import small_cnn

    torch.manual_seed(0)
    model = small_cnn(3, 18, 1, 10).to(device)
    plan = SparsityPlan(model, random_ratios(model, sparsity), refresh_every=1, seed=1) if sparsity else None
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(B, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (B,), generator=g).to(device)
    return model, plan, x, y


def train(sparsity: float, steps: int, device: str, shard=None) -> dict:
    """One untimed step (calibration when sharded), then ``steps`` timed ones."""
    from core import CGE

    model, plan, x, y = build(sparsity, device)
    zo = CGE(model, mu=5e-3, sparsity=plan, shard=shard)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, compute, wait, cpu = [], [], [], []
    for step in range(steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad()
        zo.backward(F.cross_entropy, x, y)
        opt.step()
        if plan is not None:
            plan.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            compute.append(shard.last_compute_s if shard else times[-1])
            wait.append(shard.last_wait_s if shard else 0.0)
    return {"step_s": statistics.median(times), "compute_s": statistics.mean(compute), "wait_s": statistics.mean(wait),
            "cpu_s": statistics.median(cpu),
            "bytes": shard.last_bytes if shard else 0, "active": zo.num_active(),
            "params": sum(p.numel() for p in model.parameters()),
            "weights": {k: v.cpu().tolist() for k, v in model.state_dict().items() if v.is_floating_point()}}


def worker(name: str, steps: int, device: str, out: str) -> None:
    """One rank under torchrun; rank r writes its numbers (rank 0 also the weights) to ``out.r``."""
    from core import distributed as D

    torch.set_num_threads(1)
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    D.init_from_env(device=device, timeout=600)
    res = train(CONFIGS[name], steps, device, D.Shard())
    weights = res.pop("weights")
    Path(f"{out}.{D.rank()}").write_text(json.dumps({"rank": res, "weights": weights if D.rank() == 0 else None}))
    D.shutdown()


def run_ranks(name: str, ranks: int, steps: int, device: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "benchmarks.distributed_cge",
               "--worker", name, "--steps", str(steps), "--device", device, "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{ranks} ranks failed:\n{proc.stderr[-3000:]}")
        every = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]
        return {"ranks": [e["rank"] for e in every], "weights": every[0]["weights"]}


def deepzero_bytes(params: int, active: int, ranks: int, itemsize: int = 4) -> int:
    """Their RPC step: parameters to R − 1 workers, each worker's gradient share back."""
    return (ranks - 1) * params * itemsize + (ranks - 1) * -(-active // ranks) * itemsize


def resnet20_volume(ranks: int) -> dict:
    from core import SparsityPlan, random_ratios
    from core.sharding import split
    from core.models import build_model

    model = build_model("resnet20", in_channels=3, num_classes=10)
    plan = SparsityPlan(model, random_ratios(model, 0.9), seed=1)
    masks = plan.masks()
    active = [masks[n].reshape(-1).nonzero().squeeze(1) if n in masks else torch.arange(p.numel())
              for n, p in model.named_parameters()]
    d, params = sum(int(a.numel()) for a in active), sum(p.numel() for p in model.parameters())
    share = 40 + max(sum(int(i.numel()) for i in s) for s in split(active, ranks)) * 4
    return {"params": params, "active": d, "ours": (ranks - 1) * (40 * ranks + 4 * d), "ours_per_rank": (ranks - 1) * share,
            "deepzero": deepzero_bytes(params, d, ranks), "deepzero_master": (ranks - 1) * params * 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.device, args.out)
    from benchmarks.common import setup, write_json

    setup()
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        counts = [int(r) for r in args.ranks.split(",")]
        if device == "cuda":
            counts = [r for r in counts if r <= torch.cuda.device_count()]
        for name, sparsity in CONFIGS.items():
            alone = train(sparsity, args.steps, device)
            base = alone.pop("weights")
            for r in counts:
                if r == 1:
                    got, identical = {"ranks": [alone]}, True
                else:
                    got = run_ranks(name, r, args.steps, device)
                    identical = got["weights"] == base
                lead = got["ranks"][0]
                sent = [x["bytes"] for x in got["ranks"]]
                rows.append({"device": device, "config": name, "ranks": r, "params": alone["params"],
                             "active": alone["active"], "step_s": round(lead["step_s"], 4),
                             "speedup": round(alone["step_s"] / lead["step_s"], 2),
                             "cpu_s_all_ranks": round(sum(x["cpu_s"] for x in got["ranks"]), 4),
                             "compute_s": [round(x["compute_s"], 4) for x in got["ranks"]],
                             "wait_s": [round(x["wait_s"], 4) for x in got["ranks"]],
                             "bytes_per_rank_max": max(sent), "bytes_total": sum(sent),
                             "deepzero_bytes_total": deepzero_bytes(alone["params"], alone["active"], r),
                             "identical": identical})
    if "cuda" not in devices:
        print("no CUDA device: GPU rows skipped")
    print(f"{'device':6} {'config':14} {'ranks':>5} {'active':>7} {'step s':>8} {'speedup':>7} {'CPU s (all)':>11} "
          f"{'compute s/rank':>18} {'wait s/rank':>16} {'ours B/step':>11} {'DeepZero B/step':>15} {'identical':>9}")
    for w in rows:
        print(f"{w['device']:6} {w['config']:14} {w['ranks']:5d} {w['active']:7d} {w['step_s']:8.3f} {w['speedup']:7.2f} "
              f"{w['cpu_s_all_ranks']:11.3f} {str(w['compute_s']):>18} {str(w['wait_s']):>16} {w['bytes_total']:11d} "
              f"{w['deepzero_bytes_total']:15d} {str(w['identical']):>9}")
    volume = {r: resnet20_volume(r) for r in (2, 4, 8)}
    print("\nResNet-20, 90% sparse: bytes per step on the wire (ours: all-gather; DeepZero: parameters out, "
          "gradient shares back)")
    print(f"{'ranks':>5} {'active':>7} {'ours total':>11} {'ours/rank':>10} {'DeepZero total':>15} {'ratio':>6}")
    for r, v in volume.items():
        print(f"{r:5d} {v['active']:7d} {v['ours']:11d} {v['ours_per_rank']:10d} {v['deepzero']:15d} "
              f"{v['deepzero'] / v['ours']:6.1f}")
    path = write_json("distributed_cge", {"steps": args.steps, "batch": B, "rows": rows, "resnet20_volume": volume,
                                          "gpu": "cuda" in devices})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
