"""Solver speed: ms per sample-step of every adapter at a few batch sizes.

Burgers (n = 32 and 256) in process, the PhiFlow wake flow at 32×64 (target: ≤ 15 ms per
sample-step at batch 32) and 128×256, and Burgers behind the subprocess wire format and the
loopback HTTP adapter (their overhead). Prints a table, writes JSON.

    python -m benchmarks.solver_speed [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import setup, write_json

ROOT = Path(__file__).resolve().parents[1]


def per_sample(solver, batch: int, steps: int, conds=None) -> float:
    state = solver.initial_state(batch) if hasattr(solver, "initial_state") else np.zeros((batch, *solver.state_shape))
    conds = conds(batch) if conds else {}
    state = solver.step(state, **conds)
    t = time.perf_counter()
    for _ in range(steps):
        state = solver.step(state, **conds)
    return (time.perf_counter() - t) / steps / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the 128×256 reference wake flow")
    args = p.parse_args()
    setup()
    from solvers import SubprocessSolver
    from solvers.burgers import Burgers
    from solvers.http import HTTPSolver, serve_in_thread
    from solvers.wake import WakeFlow

    rows = []

    def add(name, solver, batches, steps, conds=None):
        for b in batches:
            ms = per_sample(solver, b, steps, conds) * 1e3
            rows.append({"solver": name, "batch": b, "ms_per_sample_step": ms})
            print(f"{name:<28} batch {b:>3}  {ms:10.4f} ms/sample-step", flush=True)

    add("burgers n=32", Burgers(32), (1, 8, 64), 200)
    add("burgers n=256", Burgers(256), (1, 8, 64), 50)
    wake = WakeFlow((32, 64))
    add("wake 32x64", wake, (1, 8, 32), 5, wake.default_conditions)
    if not args.quick:
        ref = WakeFlow((128, 256))
        add("wake 128x256 (reference)", ref, (1, 8), 2, ref.default_conditions)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with SubprocessSolver([sys.executable, "-m", "solvers.example_server", "--solver", "burgers"], env=env) as sub:
        add("burgers n=32 via subprocess", sub, (1, 64), 200)
    server, url = serve_in_thread(Burgers(32))
    try:
        add("burgers n=32 via HTTP", HTTPSolver(url), (1, 64), 100)
    finally:
        server.shutdown()
        server.server_close()
    print(f"wrote {write_json('solver_speed', {'rows': rows})}")


if __name__ == "__main__":
    main()
