"""PDE correction speed: ZO-SOL's cost per solver sample-step against the solver's own batched cost.

One ZO-SOL objective call evaluates K perturbed parameter sets on B windows of m unrolled steps;
deepzero advances all K·B states in ONE solver call per time step. Compared with:

- ``solver batched``: the solver alone on K·B states per call (the floor ZO-SOL can reach);
- ``one call per set``: the same K evaluations, one parameter set (B states) per solver call —
  what a loop over perturbations does.

The ratio ``zo-sol / solver`` is the overhead of the corrector and the bookkeeping per sample-step.
Burgers (32 cells) and the PhiFlow wake flow (32×64). Prints a table, writes JSON.

    python -m benchmarks.pde_speed [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import setup, write_json


def _case(name: str, solver, family, cond: dict[str, np.ndarray], K: int, B: int, m: int, repeats: int) -> dict:
    from applications.pde_correction.config import PDEConfig
    from applications.pde_correction.rollout import Window, zo_objective
    from applications.pde_correction.train import build_corrector

    rng = np.random.default_rng(0)
    start = np.asarray(solver.initial_state(B)) if hasattr(solver, "initial_state") else rng.standard_normal(
        (B, *solver.state_shape))
    start = torch.from_numpy(start + 1e-3 * rng.standard_normal(start.shape))
    planes = family.cond_planes({k: torch.from_numpy(v) for k, v in cond.items()})
    w = Window(start, start[:, None].repeat(1, m, 1), cond, planes)
    cin = family.field_channels + family.cond_channels
    net = build_corrector(PDEConfig(), family, [1.0] * cin, [1.0] * family.field_channels)
    obj = zo_objective(solver, family, w)
    params = {n: p.detach()[None].repeat(K, *([1] * p.dim())) for n, p in net.named_parameters()}
    big = np.concatenate([start.numpy()] * K)
    big_cond = {k: np.concatenate([v] * K) for k, v in cond.items()}

    def timed(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    def solver_only():
        s = big
        for _ in range(m):
            s = solver.step(s, **big_cond)

    def per_set():
        for k in range(K):
            obj(net, {n: v[k:k + 1] for n, v in params.items()})

    steps = K * B * m
    t_solver, t_zo, t_loop = timed(solver_only), timed(lambda: obj(net, params)), timed(per_set)
    row = {"case": name, "K": K, "B": B, "m": m, "solver_us_per_sample_step": 1e6 * t_solver / steps,
           "zo_sol_us_per_sample_step": 1e6 * t_zo / steps, "per_set_us_per_sample_step": 1e6 * t_loop / steps}
    row["zo_sol_over_solver"] = row["zo_sol_us_per_sample_step"] / row["solver_us_per_sample_step"]
    row["per_set_over_zo_sol"] = row["per_set_us_per_sample_step"] / row["zo_sol_us_per_sample_step"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Burgers only, fewer repeats")
    args = p.parse_args()
    setup()
    from applications.pde_correction.families import BurgersFamily, WakeFamily
    from solvers.burgers import Burgers

    rows = []
    burgers = Burgers(32, nu=0.01, dt=0.05, umax=3.0)
    forcing = 0.2 * np.sin(np.linspace(0, 2 * np.pi, 32, endpoint=False))[None].repeat(8, 0)
    rows.append(_case("burgers n=32", burgers, BurgersFamily(4, (32,)), {"forcing": forcing}, K=64, B=8, m=8,
                      repeats=2 if args.quick else 5))
    if not args.quick:
        from solvers.wake import WakeFlow

        wake = WakeFlow((32, 64))
        rows.append(_case("wake 32x64", wake, WakeFamily(4, wake.state_shape), {"re": np.geomspace(150, 2300, 4)},
                          K=8, B=4, m=2, repeats=2))
    head = ("case", "K", "B", "m", "solver µs", "zo-sol µs", "per-set µs", "zo-sol/solver", "per-set/zo-sol")
    print(" | ".join(head))
    for r in rows:
        print(f"{r['case']} | {r['K']} | {r['B']} | {r['m']} | {r['solver_us_per_sample_step']:.1f} | "
              f"{r['zo_sol_us_per_sample_step']:.1f} | {r['per_set_us_per_sample_step']:.1f} | "
              f"{r['zo_sol_over_solver']:.2f} | {r['per_set_over_zo_sol']:.1f}")
    print(f"wrote {write_json('pde_speed', {'rows': rows})}")


if __name__ == "__main__":
    main()
