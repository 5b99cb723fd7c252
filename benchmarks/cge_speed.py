"""CGE speed: deepzero's fast engine vs the paper's block-reuse loop, torchzero's FDM and the FLOP floor.

The paper's small CNN (depth 3: [conv3×3 18ch → BN → ReLU → maxpool2] ×3, global average pool,
Linear(18, 10); 6,346 parameters) on real MNIST, batch 64, train-mode BN, dense and 90% sparse
(ZO-GraSP layer-wise ratios, one random mask draw). One forward-difference CGE step, μ = 5e-3.

- naive: one full forward per coordinate (``CGE(engine="naive")``);
- torchzero: ``tz.m.FDM(formula="forward")`` of torchzero 0.4.4, the generic coordinate loop a
  user would otherwise pick (dense only: it has no coordinate masks; skipped when not installed);
- reference: one full-batch forward per coordinate restarting at the owning block (feature reuse
  per block, as DeepZero's public code does), standard PyTorch layers;
- ours: ``CGE(engine="auto")`` — the fast exact engine;
- floor: the FLOPs an exact delta computation cannot avoid (the changed channel in the perturbed
  layer, channel-local layers on that channel, a one-input-channel convolution in the next conv,
  full recompute only after that; none for a conv bias that train-mode BatchNorm removes, whose
  difference is exactly 0) at this machine's single-thread fp32 GEMM rate.

Times are CPU seconds of this process (one thread; ours the minimum over repeats): on a machine
shared with other jobs they move far less than wall time. The machine's speed still drifts over
minutes, so the GEMM rate, our step and the reference are measured in interleaved rounds (3 by
default); each round gives its own ratios, and the table shows the median round (by ref/ours) with
every round listed under it. The naive loop and torchzero (about a minute each) run once.
The per-layer table splits our step by the layer whose coordinates are perturbed (the engine run
on that layer's coordinates only, minus the step without any), against that layer's floor.

Accuracy: in float64 ‖ĝ_ours − ĝ_naive‖/‖ĝ_naive‖; in float32 the distance of ours and of the naive
float32 loop to the exact float64 finite difference. Prints tables, writes JSON.

    python -m benchmarks.cge_speed [--quick] [--rounds 3]   # --quick: sparse only, no naive loop or torchzero
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import setup, write_json


def model_and_batch(dtype=torch.float32, device="cpu"):
    from core.models import small_cnn
    from core.runtime.data import load_dataset

    torch.manual_seed(0)
    model = small_cnn(3, 18, 1, 10).to(dtype=dtype, device=device)
    data = load_dataset("mnist")
    return model, data.train.x[:64].to(dtype=dtype, device=device), data.train.y[:64].to(device)


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
        g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
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


def torchzero_fdm(model, x, y, mu) -> torch.Tensor | None:
    """torchzero's forward-difference FDM gradient (parameters left unchanged), or None if not installed."""
    try:
        import torchzero as tz
    except ImportError:
        return None
    saved = [buf.clone() for buf in model.buffers()]
    opt = tz.Optimizer(model.parameters(), tz.m.FDM(h=mu, formula="forward"), tz.m.LR(0.0))

    def closure(backward=True):
        with torch.no_grad():
            return F.cross_entropy(model(x), y)

    opt.step(closure)
    with torch.no_grad():
        for buf, s in zip(model.buffers(), saved):
            buf.copy_(s)
    return grads_of(model)


def flop_floor(model, x, active, forward: bool = True) -> float:
    """FLOPs of an exact delta evaluation of every active coordinate (see module docstring)."""
    B = x.shape[0]
    shapes, h = [], x
    with torch.no_grad():
        for m in model:
            out = m(h)
            shapes.append((h.shape, out.shape, m))
            h = out
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
        nxt = mods[li + 1] if li + 1 < len(mods) else None
        if p is getattr(m, "bias", None) and isinstance(nxt, nn.BatchNorm2d) and nxt.training:
            continue                               # train-mode BN removes the shift: nothing to compute
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
    return total + (full_cost(0) if forward else 0.0)    # plus the unperturbed forward


def grads_of(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: bool = True, device="cpu") -> tuple[float, float, object]:
    """(min CPU seconds, min wall seconds, last result); on a GPU the CPU time is the wall time."""
    out = fn() if warmup else None
    cpu = wall = float("inf")
    for _ in range(repeats):
        _sync(device)
        t, w = time.process_time(), time.perf_counter()
        out = fn()
        _sync(device)
        cpu, wall = min(cpu, time.process_time() - t), min(wall, time.perf_counter() - w)
    return (wall if torch.device(device).type == "cuda" else cpu), wall, out


def gemm_rate(n: int = 1024, repeats: int = 5, device="cpu") -> float:
    """Single-thread fp32 GEMM rate in FLOP/s (the best of ``repeats``, CPU time as in ``timed``)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds, _, _ = timed(lambda: a @ b, repeats, device=device)
    return 2 * n ** 3 / seconds


def _layer_names(model) -> list[str]:
    kinds = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.Linear: "linear"}
    seen: dict[str, int] = {}
    names = []
    for i, m in enumerate(model):
        kind = kinds.get(type(m))
        if kind is None or not any(True for _ in m.parameters()):
            continue
        seen[kind] = seen.get(kind, 0) + 1
        names.append((i, f"{kind}{seen[kind]}" if kind != "linear" else "linear"))
    return names


def layer_breakdown(model, x, y, mu, active, rate, repeats, device) -> list[dict]:
    """Our step split by source layer: time of its coordinates alone (minus the empty step) vs its floor."""
    from core.engine import FastCGE
    from core.estimators.precision import ieee_float32

    params = list(model.named_parameters())
    engine = FastCGE(model, params)

    def step(act):                                    # as CGE.backward runs it: no TF32 on a GPU
        with torch.no_grad(), ieee_float32():
            return engine.estimate(F.cross_entropy, x, y, mu, False, act, lambda: None)

    base, _, _ = timed(lambda: step([a[:0] for a in active]), repeats, device=device)
    rows = [{"layer": "unperturbed forward, setup", "coordinates": 0, "s": base, "floor_s": None}]
    for i, name in _layer_names(model):
        owned = {id(p) for p in model[i].parameters()}
        act = [a if id(p) in owned else a[:0] for (_, p), a in zip(params, active)]
        n = sum(int(a.numel()) for a in act)
        if n == 0:
            continue
        t, _, _ = timed(lambda: step(act), repeats, device=device)
        floor = flop_floor(model, x, act, forward=False) / rate
        rows.append({"layer": f"{name} ({i})", "coordinates": n, "s": max(t - base, 0.0), "floor_s": floor})
    for r in rows:
        r["over_floor"] = r["s"] / r["floor_s"] if r["floor_s"] else None
    return rows


def rounds_of(ours, model, x, y, mu, active, rounds: int, repeats: int, device) -> list[dict]:
    """Interleaved rounds, each: the GEMM rate, our step (min of ``repeats``) and one reference step.

    The machine's speed drifts over minutes, so each ratio pairs numbers taken seconds apart; the
    table reports the median round and the range.
    """
    out = []
    for _ in range(rounds):
        rate = gemm_rate(device=device)
        t_ours, w_ours, _ = timed(lambda: ours.backward(F.cross_entropy, x, y), repeats, device=device)
        t_ref, _, g_ref = timed(lambda: reference_cge(model, x, y, mu, active), 1, warmup=False, device=device)
        out.append({"gemm_gflops": rate / 1e9, "ours_s": t_ours, "ours_wall_s": w_ours, "reference_s": t_ref,
                    "speedup_vs_reference": t_ref / t_ours, "g_ref": g_ref})
    return out


def run(sparse: bool, repeats: int, quick: bool, rounds: int = 3, device="cpu") -> dict:
    from core import CGE, SparsityPlan, zo_grasp_ratios

    mu = 5e-3
    model, x, y = model_and_batch(device=device)
    plan = None
    if sparse:
        ratios = zo_grasp_ratios(model, F.cross_entropy, x, y, 0.9, q=64, generator=torch.Generator().manual_seed(0))
        plan = SparsityPlan(model, ratios, seed=0)
    ours = CGE(model, mu=mu, sparsity=plan)
    active = ours.active_indices()
    d = sum(int(i.numel()) for i in active)
    flops = flop_floor(model, x, active)
    timing = rounds_of(ours, model, x, y, mu, active, rounds, repeats, device)
    for r in timing:
        r["ours_over_floor"] = r["ours_s"] / (flops / (r["gemm_gflops"] * 1e9))
    ours.backward(F.cross_entropy, x, y)
    g_ours32, g_ref = grads_of(model).clone(), timing[-1].pop("g_ref")
    for r in timing:
        r.pop("g_ref", None)
    mid = sorted(timing, key=lambda r: r["speedup_vs_reference"])[len(timing) // 2]     # the median round
    rate = mid["gemm_gflops"] * 1e9
    t_ours = mid["ours_s"]
    naive = CGE(model, mu=mu, sparsity=plan, engine="naive")
    t_naive = t_tz = None
    if not quick:
        t_naive, _, _ = timed(lambda: naive.backward(F.cross_entropy, x, y), 1, warmup=False, device=device)
        if not sparse:
            t_tz, _, g_tz = timed(lambda: torchzero_fdm(model, x, y, mu), 1, warmup=False, device=device)
            t_tz = t_tz if g_tz is not None else None
    else:
        naive.backward(F.cross_entropy, x, y)
    g_naive32 = grads_of(model).clone()
    layers = layer_breakdown(model, x, y, mu, active, rate, repeats, device)
    # float64: the algebra is exact, so ours must equal the naive loop up to rounding
    m64, x64 = model.double(), x.double()
    CGE(m64, mu=mu, sparsity=plan).backward(F.cross_entropy, x64, y)
    g_ours64 = grads_of(m64).clone()
    CGE(m64, mu=mu, sparsity=plan, engine="naive").backward(F.cross_entropy, x64, y)
    g_exact = grads_of(m64).clone()

    def rel(g):
        return float((g.double() - g_exact).norm() / g_exact.norm())

    return {"setting": ("90% sparse" if sparse else "dense") + ("" if device == "cpu" else f" ({device})"),
            "active_coordinates": d, "naive_s": t_naive, "torchzero_fdm_s": t_tz,
            "reference_s": mid["reference_s"], "ours_s": t_ours, "ours_wall_s": mid["ours_wall_s"],
            "floor_s": flops / rate, "gemm_gflops": rate / 1e9,
            "speedup_vs_reference": mid["speedup_vs_reference"], "ours_over_floor": mid["ours_over_floor"],
            "speedup_vs_naive": t_naive / t_ours if t_naive else None,
            "speedup_vs_torchzero": t_tz / t_ours if t_tz else None, "rounds": timing,
            "fp64_rel_diff_ours_vs_naive": rel(g_ours64), "fp32_rel_err_ours": rel(g_ours32),
            "fp32_rel_err_naive": rel(g_naive32), "fp32_rel_err_reference": rel(g_ref), "layers": layers}


def _fmt(v, spec):
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def report(rows: list[dict]) -> None:
    print(f"{'setting':<13} {'d':>5} {'naive s':>8} {'tz s':>7} {'ref s':>7} {'ours s':>7} {'floor s':>8} "
          f"{'tz/ours':>8} {'ref/ours':>8} {'ours/floor':>10} {'fp64 diff':>9} {'fp32 ours':>9} {'fp32 naive':>10}")
    for r in rows:
        print(f"{r['setting']:<13} {r['active_coordinates']:>5} {_fmt(r['naive_s'], '8.2f')} "
              f"{_fmt(r['torchzero_fdm_s'], '7.2f')} {r['reference_s']:>7.2f} {r['ours_s']:>7.3f} "
              f"{r['floor_s']:>8.3f} {_fmt(r['speedup_vs_torchzero'], '7.1f')}x {r['speedup_vs_reference']:>7.1f}x "
              f"{r['ours_over_floor']:>9.1f}x {r['fp64_rel_diff_ours_vs_naive']:>9.1e} "
              f"{r['fp32_rel_err_ours']:>9.1e} {r['fp32_rel_err_naive']:>10.1e}")
    for r in rows:
        spread = ", ".join(f"{t['ours_s']:.3f} s {t['speedup_vs_reference']:.1f}x {t['ours_over_floor']:.1f}x "
                           f"({t['gemm_gflops']:.0f} GFLOP/s)" for t in r["rounds"])
        print(f"{r['setting']}: rounds (ours, ref/ours, ours/floor): {spread}; the table shows the median")
    for r in rows:
        print(f"\n{r['setting']}: our step by source layer (CPU s; floor at {r['gemm_gflops']:.1f} GFLOP/s)")
        print(f"  {'layer':<28} {'coords':>6} {'ours s':>7} {'share':>6} {'floor s':>8} {'ours/floor':>10}")
        total = sum(x["s"] for x in r["layers"])
        for x in r["layers"]:
            print(f"  {x['layer']:<28} {x['coordinates']:>6} {x['s']:>7.3f} {x['s'] / total:>6.0%} "
                  f"{_fmt(x['floor_s'], '8.4f')} {_fmt(x['over_floor'], '9.1f')}"
                  f"{'x' if x['over_floor'] else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sparse setting only, no naive loop or torchzero")
    p.add_argument("--repeats", type=int, default=7, help="our step's repeats per round (the minimum counts)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of (GEMM rate, ours, reference); the median round is reported")
    args = p.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    setup()
    rows = [run(True, args.repeats, args.quick, args.rounds)]
    if not args.quick:
        rows.insert(0, run(False, args.repeats, args.quick, args.rounds))
    if torch.cuda.is_available():
        rows.append(run(False, args.repeats, True, args.rounds, device="cuda"))
    report(rows)
    if not torch.cuda.is_available():
        print("\nGPU: skipped (no CUDA device)")
    print(f"wrote {write_json('cge_speed', {'rows': rows})}")


if __name__ == "__main__":
    main()
