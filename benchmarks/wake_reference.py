"""The wake flow's reference: generation cost, vortex shedding (Strouhal number) and the source's drift.

1. Runs the reference (128×256) from Um et al.'s start for ``--steps`` steps at each Reynolds number
   (one batched solver call per step), timing it: ms per sample-step and seconds per simulation.
2. Shedding: the lateral velocity v_x on the wake's centre line 2.5 diameters behind the disc,
   over the last ``--window`` steps; its dominant frequency f gives St = f·D/U (D = 20, U = 1).
   Cylinder wakes shed at St ≈ 0.2 over a wide range of Re.
3. Drift: from the spun-up reference, the source solver (32×64) is started on the block-averaged
   state and both run ``--drift`` more steps; the MAE between the source and the down-sampled
   reference at several horizons is what a corrector learns to remove (and the source's own St).

Prints a table, writes JSON.   python -m benchmarks.wake_reference [--steps 1500 --re 390.6,1562.5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import setup, write_json


def probe_index(w) -> tuple[int, int]:
    (X, Y), _ = w.face_centers()
    return np.unravel_index(np.argmin((X - 50) ** 2 + (Y - 100) ** 2), X.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="reference steps (Um et al.: 1500, first 999 discarded)")
    p.add_argument("--re", default="390.6,1562.5", help="comma-separated Reynolds labels")
    p.add_argument("--window", type=int, default=500, help="last steps used for the Strouhal number")
    p.add_argument("--drift", type=int, default=200, help="steps of the source-vs-reference drift")
    args = p.parse_args()
    setup()
    from tqdm import tqdm

    from solvers.wake import WakeFlow, downsample_faces, strouhal

    re = np.array([float(r) for r in args.re.split(",")])
    ref, src = WakeFlow((128, 256)), WakeFlow((32, 64))
    pi, ps = probe_index(ref), probe_index(src)
    s = ref.initial_state(len(re))
    lateral = np.zeros((args.steps, len(re)))
    t0 = time.perf_counter()
    for t in tqdm(range(args.steps), desc="reference", unit="step"):
        s = ref.step(s, re=re)
        lateral[t] = ref.split(s)[0][:, pi[0], pi[1]]
    gen_s = time.perf_counter() - t0

    def coarse(state):
        vx, vy = downsample_faces(*ref.split(state), 4)
        return src.join(vx, vy)

    c = coarse(s)
    horizons = sorted({h for h in (1, 10, 50, 100, 200, args.drift) if h <= args.drift})
    mae, lat_ref, lat_src = {}, [], []
    for t in tqdm(range(1, args.drift + 1), desc="drift", unit="step"):
        s, c = ref.step(s, re=re), src.step(c, re=re)
        lat_ref.append(ref.split(s)[0][:, pi[0], pi[1]])
        lat_src.append(src.split(c)[0][:, ps[0], ps[1]])
        if t in horizons:
            mae[t] = np.abs(c - coarse(s)).mean(axis=1)
    lat_ref, lat_src = np.array(lat_ref), np.array(lat_src)
    rows = []
    for k, r in enumerate(re):
        sig = lateral[-args.window:, k]
        rows.append({"re": float(r), "strouhal_reference": strouhal(sig), "lateral_amplitude": float(sig.std()),
                     "strouhal_source_drift": strouhal(lat_src[:, k]) if args.drift >= 100 else None,
                     "source_lateral_amplitude": float(lat_src[:, k].std()),
                     **{f"drift_mae_{h}": float(mae[h][k]) for h in horizons}})
    per_step = gen_s / args.steps / len(re)
    print(f"reference 128x256: {1e3 * gen_s / args.steps:.0f} ms per step at batch {len(re)} = "
          f"{1e3 * per_step:.0f} ms per sample-step; {per_step * 1500:.0f} s per 1500-step simulation")
    print("Re | St reference | |v_x| std | St source (drift) | " + " | ".join(f"MAE@{h}" for h in horizons))
    for r in rows:
        st_src = f"{r['strouhal_source_drift']:.3f}" if r["strouhal_source_drift"] is not None else "-"
        print(f"{r['re']:.1f} | {r['strouhal_reference']:.3f} | {r['lateral_amplitude']:.3f} | {st_src} | "
              + " | ".join(f"{r[f'drift_mae_{h}']:.4f}" for h in horizons))
    print(f"wrote {write_json('wake_reference', {'steps': args.steps, 'window': args.window, 'drift': args.drift, 'seconds': gen_s, 'ms_per_sample_step': 1e3 * per_step, 'rows': rows})}")


if __name__ == "__main__":
    main()
