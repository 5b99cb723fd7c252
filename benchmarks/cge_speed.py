"""CGE speed: naive loop vs the reference algorithm vs deepzero's fast engine vs the FLOP floor.

The paper's small CNN (depth 3: [conv3×3 18ch → BN → ReLU → maxpool2] ×3, global average pool,
Linear(18, 10); 6,346 parameters) on real MNIST, batch 64, train-mode BN, dense and 90% sparse
(ZO-GraSP layer-wise ratios, one random mask draw). One forward-difference CGE step, μ = 5e-3.

- naive: one full forward per coordinate (``CGE(engine="naive")``);
- reference: one full-batch forward per coordinate restarting at the owning block (feature reuse
  per block, as DeepZero's public code does), standard PyTorch layers;
- ours: ``CGE(engine="auto")`` — the fast exact engine;
- floor: the FLOPs an exact delta computation cannot avoid (the changed channel in the perturbed
  layer, channel-local layers on that channel, a one-input-channel convolution in the next conv,
  full recompute only after that) at this machine's measured single-thread fp32 GEMM rate.

Accuracy: in float64 ‖ĝ_ours − ĝ_naive‖/‖ĝ_naive‖; in float32 the distance of ours and of the naive
float32 loop to the exact float64 finite difference. Prints a table, writes JSON.

    python benchmarks/cge_speed.py [--quick]      # --quick: sparse only, fewer repeats
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import gemm_rate, setup, write_json


def model_and_batch(dtype=torch.float32):
    from core.models import small_cnn
    from core.runtime.data import load_dataset

    torch.manual_seed(0)
    model = small_cnn(3, 18, 1, 10).to(dtype)
    data = load_dataset("mnist")
    return model, data.train.x[:64].to(dtype), data.train.y[:64]


def blocks_of(model: nn.Sequential) -> list[nn.Sequential]:
    """[conv, bn, relu, pool] ×3 and [gap, flatten, linear], as the paper's code splits the CNN."""
    mods = list(model)
    return [nn.Sequential(*mods[i:i + 4]) for i in range(0, 12, 4)] + [nn.Sequential(*mods[12:])]


@torch.no_grad()
def reference_cge(model, x, y, mu, active) -> torch.Tensor:
    """Block-level feature reuse: cache every block's input, re-run from the owning block."""
    blocks = blocks_of(model)
    inputs, h = [], x
    for b in blocks:
        inputs.append(h)
        h = b(h)
    loss0 = F.cross_entropy(h, y)
    owner = {id(p): k for k, b in enumerate(blocks) for p in b.parameters()}
    saved = [buf.clone() for buf in model.buffers()]
    grads = []
    for p, idx in zip(model.parameters(), active):
        g = torch.zeros(p.numel(), dtype=p.dtype)
        k = owner[id(p)]
        flat = p.data.view(-1)
        for j in idx.tolist():
            old = flat[j].clone()
            flat[j] = old + mu
            h = inputs[k]
            for b in blocks[k:]:
                h = b(h)
            g[j] = (F.cross_entropy(h, y) - loss0) / mu
            flat[j] = old
        grads.append(g)
    for buf, s in zip(model.buffers(), saved):
        buf.copy_(s)
    return torch.cat(grads)


def flop_floor(model, x, active) -> float:
    """FLOPs of an exact delta evaluation of every active coordinate (see module docstring)."""
    B = x.shape[0]
    shapes, h = [], x
    with torch.no_grad():
        for m in model:
            shapes.append((h.shape, m))
            h = m(h)
            shapes[-1] = (shapes[-1][0], h.shape, m)
    mods = list(model)

    def full_cost(start: int) -> float:
        total = 0.0
        for in_shape, out_shape, m in shapes[start:]:
            n_out = out_shape.numel()
            if isinstance(m, nn.Conv2d):
                total += 2 * n_out * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                total += 2 * n_out * m.in_features
            elif isinstance(m, nn.BatchNorm2d):
                total += 4 * n_out
            else:
                total += in_shape.numel()
        return total

    total = 0.0
    for p, idx in zip(model.parameters(), active):
        n = idx.numel()
        if n == 0:
            continue
        li = next(i for i, m in enumerate(mods) if any(q is p for q in m.parameters()))
        in_shape, out_shape, m = shapes[li]
        if isinstance(m, nn.Linear):
            total += n * 2 * B                     # one logit per sample changes
            continue
        per_channel = out_shape.numel() / out_shape[1]   # B·H·W of one channel
        cost = 2 * per_channel                     # the changed channel in the perturbed layer
        j = li + 1
        while j < len(mods) and not isinstance(mods[j], (nn.Conv2d, nn.Linear)):
            cost += 4 * shapes[j][0].numel() / shapes[j][0][1]    # channel-local layers on one channel
            j += 1
        if j < len(mods):
            nxt_in, nxt_out, nxt = shapes[j]
            k = nxt.kernel_size[0] * nxt.kernel_size[1] if isinstance(nxt, nn.Conv2d) else 1
            cost += 2 * nxt_out.numel() * k        # one-input-channel conv / one-column matmul
            cost += full_cost(j + 1)
        total += n * cost
    return total + full_cost(0)                    # plus the unperturbed forward


def grads_of(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def timed(fn, repeats: int, warmup: bool = True) -> tuple[float, object]:
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(sparse: bool, repeats: int, skip_naive: bool) -> dict:
    from core import CGE, SparsityPlan, zo_grasp_ratios

    mu = 5e-3
    model, x, y = model_and_batch()
    plan = None
    if sparse:
        ratios = zo_grasp_ratios(model, F.cross_entropy, x, y, 0.9, q=64, generator=torch.Generator().manual_seed(0))
        plan = SparsityPlan(model, ratios, seed=0)
    ours = CGE(model, mu=mu, sparsity=plan)
    active = ours.active_indices()
    d = sum(int(i.numel()) for i in active)
    t_ours, _ = timed(lambda: ours.backward(F.cross_entropy, x, y), repeats)
    g_ours32 = grads_of(model).clone()
    t_ref, g_ref = timed(lambda: reference_cge(model, x, y, mu, active), 1)
    naive = CGE(model, mu=mu, sparsity=plan, engine="naive")
    t_naive = None
    if not skip_naive:
        t_naive, _ = timed(lambda: naive.backward(F.cross_entropy, x, y), 1, warmup=False)
    else:
        naive.backward(F.cross_entropy, x, y)
    g_naive32 = grads_of(model).clone()
    # float64: the algebra is exact, so ours must equal the naive loop up to rounding
    m64 = model.double()
    x64 = x.double()
    CGE(m64, mu=mu, sparsity=plan).backward(F.cross_entropy, x64, y)
    g_ours64 = grads_of(m64).clone()
    CGE(m64, mu=mu, sparsity=plan, engine="naive").backward(F.cross_entropy, x64, y)
    g_exact = grads_of(m64).clone()
    rel64 = float((g_ours64 - g_exact).norm() / g_exact.norm())
    err_ours32 = float((g_ours32.double() - g_exact).norm() / g_exact.norm())
    err_naive32 = float((g_naive32.double() - g_exact).norm() / g_exact.norm())
    err_ref32 = float((g_ref.double() - g_exact).norm() / g_exact.norm())
    floor_flops = flop_floor(model.float(), x, active)
    rate = gemm_rate()
    t_floor = floor_flops / rate
    return {"setting": "90% sparse" if sparse else "dense", "active_coordinates": d,
            "naive_s": t_naive, "reference_s": t_ref, "ours_s": t_ours, "floor_s": t_floor,
            "floor_gflop": floor_flops / 1e9, "gemm_gflops": rate / 1e9,
            "speedup_vs_reference": t_ref / t_ours, "speedup_vs_naive": (t_naive / t_ours) if t_naive else None,
            "ours_over_floor": t_ours / t_floor, "fp64_rel_diff_ours_vs_naive": rel64,
            "fp32_rel_err_ours": err_ours32, "fp32_rel_err_naive": err_naive32, "fp32_rel_err_reference": err_ref32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sparse setting only, naive loop skipped")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    setup()
    rows = [run(True, args.repeats, skip_naive=args.quick)]
    if not args.quick:
        rows.insert(0, run(False, args.repeats, skip_naive=False))
    head = (f"{'setting':<11} {'d':>5} {'naive s':>8} {'ref s':>7} {'ours s':>7} {'floor s':>8} "
            f"{'ref/ours':>8} {'ours/floor':>10} {'fp64 diff':>9} {'fp32 ours':>9} {'fp32 naive':>10}")
    print(head)
    for r in rows:
        naive = f"{r['naive_s']:.2f}" if r["naive_s"] else "-"
        print(f"{r['setting']:<11} {r['active_coordinates']:>5} {naive:>8} {r['reference_s']:>7.2f} "
              f"{r['ours_s']:>7.3f} {r['floor_s']:>8.3f} {r['speedup_vs_reference']:>7.1f}x "
              f"{r['ours_over_floor']:>9.1f}x {r['fp64_rel_diff_ours_vs_naive']:>9.1e} "
              f"{r['fp32_rel_err_ours']:>9.1e} {r['fp32_rel_err_naive']:>10.1e}")
    print(f"GEMM rate (fp32, 1 thread): {rows[0]['gemm_gflops']:.1f} GFLOP/s")
    print(f"wrote {write_json('cge_speed', {'rows': rows})}")


if __name__ == "__main__":
    main()
