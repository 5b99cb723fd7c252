"""Defense speed: a ZO-DS step through the fast engine vs the naive CGE loop, and certification throughput.

1. ZO-DS: one sparse forward-difference CGE step on the default preset's denoiser (DnCNN depth 4,
   width 8, 90% of its conv weights without a ZO gradient) in front of the default target (the
   depth-3 CNN behind a ``core.BlackBox``), batch 32 of real MNIST digits with σ = 0.25 noise. Both
   engines make the same classifier queries; we report queries per second of each and their ratio,
   and the gradients' agreement.
2. Certification: noisy classifier evaluations per second of ``Smooth.certify`` (noise and
   queries in batches of 500) vs a one-sample-at-a-time loop, and the seconds per certified example
   at n = 10,000 (n0 = 100).

    python -m benchmarks.defense_speed [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import setup, write_json


def _target_and_data():
    from core.models import build_model, with_normalize
    from core.runtime.data import load_dataset

    data = load_dataset("mnist", normalize=False)
    torch.manual_seed(0)
    net = with_normalize(build_model("cnn", depth=3, width=18, in_channels=1, num_classes=10), (data.mean, data.std))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(0, 2000, 64):                                  # a quickly trained, realistic target
        opt.zero_grad()
        F.cross_entropy(net(data.train.x[i:i + 64]), data.train.y[i:i + 64]).backward()
        opt.step()
    return net.eval().requires_grad_(False), data


def zo_ds_step(net, data, quick: bool) -> dict:
    from core import CGE, BlackBox, SparsityPlan
    from core.models import build_model
    from core.sparsity import random_ratios

    torch.manual_seed(1)
    denoiser = build_model("dncnn", in_channels=1, depth=4, width=8)
    for p in denoiser.parameters():                               # a denoiser past MSE pre-training
        p.data.add_(0.01 * torch.randn_like(p))
    x = data.train.x[:32]
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    rows, grads = {}, {}
    for engine in ("auto", "naive"):
        box = BlackBox(net, name="classifier")
        model = nn.Sequential(denoiser, box)
        plan = SparsityPlan(model, random_ratios(model, 0.9), seed=3)
        zo = CGE(model, mu=5e-3, sparsity=plan, engine=engine, params=list(denoiser.parameters()))
        repeats = 1 if (quick or engine == "naive") else 3
        start = time.perf_counter()
        for _ in range(repeats):
            zo.backward(F.cross_entropy, noisy, y)
        wall = (time.perf_counter() - start) / repeats
        grads[engine] = torch.cat([p.grad.reshape(-1) for p in denoiser.parameters()]).clone()
        rows[engine] = {"seconds_per_step": wall, "queries_per_step": box.queries / repeats,
                        "queries_per_second": box.queries / repeats / wall, "coordinates": zo.num_active()}
    diff = float((grads["auto"] - grads["naive"]).norm() / grads["naive"].norm().clamp_min(1e-30))
    return {"fast": rows["auto"], "naive": rows["naive"],
            "speedup": rows["naive"]["seconds_per_step"] / rows["auto"]["seconds_per_step"],
            "relative_difference": diff}


def certification(net, data, quick: bool) -> dict:
    from applications.certified_defense.smoothing import Smooth

    x = data.test.x[0]
    smooth = Smooth(lambda b: net(b), 10, 0.25)
    gen = torch.Generator().manual_seed(0)
    n = 2_000 if quick else 10_000
    start = time.perf_counter()
    smooth.certify(x, 100, n, 0.001, 500, generator=gen)
    batched = time.perf_counter() - start
    one = 200
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(one):
            net((x + 0.25 * torch.randn(x.shape, generator=gen)).unsqueeze(0)).argmax(1)
    single = (time.perf_counter() - start) / one
    return {"n": n, "seconds_per_example": batched * 10_000 / n, "evaluations_per_second": (n + 100) / batched,
            "one_at_a_time_evaluations_per_second": 1.0 / single,
            "speedup": (n + 100) / batched * single}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and n = 2,000")
    args = p.parse_args()
    setup()
    net, data = _target_and_data()
    step = zo_ds_step(net, data, args.quick)
    cert = certification(net, data, args.quick)
    print(f"{'ZO-DS step (DnCNN-4x8 + CNN-3, B=32, 90% sparse)':<52} {'s/step':>8} {'queries/step':>13} {'queries/s':>10}")
    for name in ("fast", "naive"):
        r = step[name]
        print(f"  {name:<50} {r['seconds_per_step']:>8.2f} {r['queries_per_step']:>13.0f} {r['queries_per_second']:>10.0f}")
    print(f"  fast / naive speed-up {step['speedup']:.1f}x; gradient relative difference {step['relative_difference']:.1e}")
    print(f"certification: {cert['evaluations_per_second']:.0f} noisy evaluations/s batched vs "
          f"{cert['one_at_a_time_evaluations_per_second']:.0f}/s one at a time ({cert['speedup']:.1f}x); "
          f"{cert['seconds_per_example']:.2f} s per certified example at n = 10,000")
    print(f"wrote {write_json('defense_speed', {'quick': args.quick, 'zo_ds_step': step, 'certification': cert})}")


if __name__ == "__main__":
    main()
