"""Reference data: fine simulations, spin-up discarded, block-averaged to the source resolution.

One directory per dataset::

    manifest.json            family, solvers, resolutions, conditions, steps, versions, timings
    train.npz / test.npz     frames [S, steps + 1, *source state], conditions (source resolution)
    <split>.partial.npz      a generation in progress (fine states, frames so far): resumed

Simulations of a split are advanced together in batches of ``data.batch`` (one solver call per time
step for the whole batch). Every ~30 s and after each batch the progress is written atomically, so a
killed ``deepzero pde generate`` continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from applications.pde_correction.config import PDEConfig, data_key
from applications.pde_correction.families import Family, make_family
from core.runtime.files import atomic_write
from solvers.protocol import SolverError

FORMAT = "deepzero-pde/1"
SAVE_EVERY_S = 30.0


@dataclass
class Split:
    frames: np.ndarray                     # [S, T + 1, *state]: down-sampled reference, first kept frame at 0
    conditions: dict[str, np.ndarray]      # source-resolution conditions, [S, ...] each

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class PDEData:
    path: Path
    manifest: dict[str, Any]
    train: Split
    test: Split


def default_dir(cfg: PDEConfig) -> Path:
    from core.runtime.tracking import project_root

    if cfg.data.dir:
        p = Path(cfg.data.dir).expanduser()
        return p if p.is_absolute() else project_root() / p
    digest = hashlib.sha256(json.dumps(data_key(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return project_root() / "runs" / "pde" / "data" / f"{cfg.solver.family}-{digest}"


def open_solver(spec: str, options: dict[str, Any], timeout: float):
    """``solvers.load`` with the config's options (registered and importable solvers) or timeout (external)."""
    import solvers

    # an external program or server is configured on its own command line; it only gets the timeout
    external = spec.startswith(("exec:", "http://", "https://"))
    opts = {"timeout": timeout} if external else dict(options or {})
    try:
        return solvers.load(spec, **opts)
    except SolverError as exc:
        raise ValueError(f"solver '{spec}': {str(exc).splitlines()[0]}") from None


def family_for(cfg: PDEConfig, fine_shape: tuple[int, ...]) -> Family:
    """The config's family for a reference state of ``fine_shape`` (the source is ``factor`` coarser)."""
    s = cfg.solver
    if s.family == "wake":
        res = s.source_options.get("resolution", (32, 64))
        if not isinstance(res, (list, tuple)) or len(res) != 2 or not all(isinstance(v, int) and v > 0 for v in res):
            raise ValueError(f"solver.source_options.resolution must be two positive integers [nx, ny]; got {res!r}")
        nx, ny = res
        source = ((nx + 1) * ny + nx * (ny + 1),)
        fx, fy = nx * s.factor, ny * s.factor
        if tuple(fine_shape) != ((fx + 1) * fy + fx * (fy + 1),):
            raise ValueError(f"the reference state has shape {tuple(fine_shape)}, not that of a {fx}×{fy} staggered grid "
                             f"(source {nx}×{ny} × solver.factor {s.factor}); check solver.reference_options.resolution")
    else:
        if len(fine_shape) != 1 or fine_shape[0] % s.factor:
            raise ValueError(f"solver.family=burgers needs a 1-D reference state divisible by solver.factor = "
                             f"{s.factor}; the reference solver's state has shape {tuple(fine_shape)}")
        source = (fine_shape[0] // s.factor,)
    return make_family(s.family, s.factor, source, s.source_options)


def _save_npz(path: Path, **arrays) -> None:
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("numpy", "phiflow", "phiml", "deepzero"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def generate(cfg: PDEConfig, *, progress: bool = True) -> PDEData:
    """Generate (or finish, or reuse) the dataset the config describes; returns it loaded."""
    from tqdm import tqdm

    out = default_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    key = data_key(cfg)
    mpath = out / "manifest.json"
    if mpath.exists():
        manifest = json.loads(mpath.read_text())
        if manifest.get("key") != key:
            changed = sorted(k for k in key if manifest.get("key", {}).get(k) != key[k])
            raise ValueError(f"{out} holds a different dataset (settings differ: {', '.join(changed)}); choose "
                             f"another data.dir or delete it")
        if manifest.get("complete"):
            return load(out)
    else:
        manifest = {"format": FORMAT, "key": key, "complete": False, "versions": _versions(), "timing": {}}
        _write_manifest(mpath, manifest)         # before any work: a resumed generation is checked against it
    s, d = cfg.solver, cfg.data
    ref = open_solver(s.reference, s.reference_options, s.timeout)
    try:
        fine_shape = tuple(ref.state_shape)
        fam = family_for(cfg, fine_shape)
        manifest.update({"family": s.family, "reference": s.reference, "reference_options": s.reference_options,
                         "fine_shape": list(fine_shape), "factor": s.factor, "spinup": d.spinup, "steps": d.steps,
                         "dt": getattr(ref, "dt", None)})
        for split, count in (("train", d.train_sims), ("test", d.test_sims)):
            if (out / f"{split}.npz").exists():
                continue
            seed = cfg.run.seed * 1000 + (0 if split == "train" else 500)
            fine_cond = fam.conditions(split, count, cfg.run.seed, fine_shape)
            manifest.setdefault("conditions", {})[split] = {k: np.asarray(v).tolist() if np.asarray(v).ndim == 1
                                                            else f"array {list(np.shape(v))}"
                                                            for k, v in fine_cond.items()}
            t0 = time.perf_counter()
            start = fam.initial_states(fine_shape, count, seed)
            frames = _simulate(ref, fam, fine_cond, start, d, out / f"{split}.partial.npz",
                               desc=f"generate {split}", progress=progress, tqdm=tqdm)
            coarse = fam.coarse_conditions(fine_cond)
            _save_npz(out / f"{split}.npz", frames=frames, **{f"cond_{k}": v for k, v in coarse.items()})
            (out / f"{split}.partial.npz").unlink(missing_ok=True)
            manifest["timing"][f"{split}_s_per_sim"] = (time.perf_counter() - t0) / count
            _write_manifest(mpath, manifest)
    finally:
        ref.close()
    manifest["complete"] = True
    manifest["source_shape"] = list(fam.source_shape)
    _write_manifest(mpath, manifest)
    return load(out)


def _write_manifest(path: Path, manifest: dict) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(manifest, indent=1).encode())


def _simulate(ref, fam: Family, fine_cond: dict[str, np.ndarray], start: np.ndarray, d, partial: Path, *,
              desc: str, progress: bool, tqdm) -> np.ndarray:
    """Run all simulations of a split in batches; resumable through ``partial``."""
    count, total = len(start), d.spinup + d.steps
    done_frames: list[np.ndarray] = []
    b0, state, t, frames = 0, None, 0, []
    if partial.exists():
        z = np.load(partial)
        b0, t = int(z["batch_start"]), int(z["t"])
        done_frames = [z["done"]] if z["done"].size else []
        state, frames = (z["state"], list(z["frames"])) if z["state"].size else (None, [])
    bar = tqdm(total=count * total, desc=desc, unit="sim-step", disable=not progress,
               initial=b0 * total + (t * (len(state) if state is not None else 0)))
    last_save = time.monotonic()
    while b0 < count:
        b1 = min(count, b0 + (len(state) if state is not None else d.batch))   # a resumed batch keeps its size
        cond = {k: v[b0:b1] for k, v in fine_cond.items()}
        if state is None:
            state, t, frames = start[b0:b1], 0, []
        while t < total:
            if t >= d.spinup and len(frames) == t - d.spinup:
                frames.append(fam.downsample(state))
            try:
                state = ref.step(state, **cond)
            except SolverError as exc:
                _save_partial(partial, b0, t, state, frames, done_frames)
                bar.close()
                raise ValueError(f"the reference solver failed at step {t + 1} of simulations {b0 + 1}-{b1}: "
                                 f"{str(exc).splitlines()[0]}; progress is kept in {partial.parent}, run "
                                 "'deepzero pde generate' again to continue") from None
            t += 1
            bar.update(b1 - b0)
            if time.monotonic() - last_save > SAVE_EVERY_S:
                _save_partial(partial, b0, t, state, frames, done_frames)
                last_save = time.monotonic()
        frames.append(fam.downsample(state))
        done_frames.append(np.stack(frames, axis=1))             # [b, steps + 1, *state]
        b0, state, t, frames = b1, None, 0, []
        _save_partial(partial, b0, 0, np.zeros(0), [], done_frames)
    bar.close()
    return np.concatenate(done_frames, axis=0)


def _save_partial(path: Path, b0: int, t: int, state: np.ndarray, frames: list, done: list) -> None:
    _save_npz(path, batch_start=np.array(b0), t=np.array(t), state=state,
              frames=np.stack(frames) if frames else np.zeros((0,)),
              done=np.concatenate(done, axis=0) if done else np.zeros((0,)))


def load(path: Path) -> PDEData:
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise ValueError(f"{path} is not a complete deepzero pde dataset (run 'deepzero pde generate')")
    splits = {}
    for split in ("train", "test"):
        z = np.load(path / f"{split}.npz")
        splits[split] = Split(z["frames"], {k[5:]: z[k] for k in z.files if k.startswith("cond_")})
    return PDEData(path, manifest, splits["train"], splits["test"])
