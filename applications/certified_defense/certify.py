"""Certifying a data set with a smoothed classifier: the per-example TSV, its metrics and plots.

The table is locuslab/smoothing's (Cohen et al. 2019, ``code/certify.py``): one row per example,
``idx  label  predict  radius  correct  time``, with a header, written and flushed as it goes. Here it
also resumes: re-running on an existing table keeps its finished rows and continues after the last
one. Each example draws its noise from a generator seeded from ``(seed, idx)``, so a resumed table
equals an uninterrupted one except for the ``time`` column (seconds, wall clock).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from applications.certified_defense.smoothing import ABSTAIN, Smooth

COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
HEADER = "\t".join(COLUMNS) + "\n"
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)

Row = dict[str, Any]
"""One example: idx, label, predict (int; ABSTAIN = -1), radius (float), correct (0|1), time (seconds)."""


def example_seed(seed: int, idx: int) -> int:
    """The noise seed of example ``idx``: a function of (seed, idx) only, so any subset can be re-run."""
    if seed < 0 or idx < 0:
        raise ValueError(f"need seed >= 0 and idx >= 0; got seed={seed}, idx={idx}")
    return int(np.random.SeedSequence([seed, idx]).generate_state(1, dtype=np.uint64)[0] >> 1)


def certify_split(smooth: Smooth, x: Tensor | Sequence[Tensor], y: Tensor | Sequence[int],
                  out_path: str | Path, *, n0: int, n: int, alpha: float, batch_size: int, skip: int = 1,
                  max_examples: int | None = None, seed: int = 0, progress: bool = True) -> list[Row]:
    """Run CERTIFY on examples idx = 0, skip, 2·skip, … (at most ``max_examples``), streaming a TSV.

    :param smooth: the smoothed classifier
    :param x: the examples, ``[N, C, H, W]`` (or anything indexable giving ``[C, H, W]`` tensors)
    :param y: the true labels ``[N]``
    :param out_path: the TSV; if it exists with our header, its finished rows are kept (a partial last
        line from a kill is dropped) and certification continues after the last idx
    :param n0, n, alpha, batch_size: passed to :meth:`Smooth.certify`
    :param skip: certify every ``skip``-th example
    :param max_examples: certify at most this many examples (counting resumed rows)
    :param seed: example idx draws its noise from ``torch.Generator().manual_seed(example_seed(seed, idx))``
    :param progress: show a tqdm progress bar
    :return: every row of the table (resumed and new), in idx order
    """
    from tqdm import tqdm

    if skip < 1:
        raise ValueError(f"need skip >= 1; got skip={skip}")
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"need max_examples >= 0 or None; got max_examples={max_examples}")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} examples, {len(y)} labels")
    schedule = list(range(0, len(x), skip))[:max_examples]
    out_path = Path(out_path)
    rows = _resume(out_path, schedule, y)
    todo = schedule[len(rows):]

    fresh = not out_path.exists()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as f:
        if fresh:
            f.write(HEADER)
            f.flush()
        bar = tqdm(total=len(schedule), initial=len(rows), desc="certify", unit="ex", disable=not progress,
                   dynamic_ncols=True)
        try:
            for idx in todo:
                xi, label = x[idx], int(y[idx])
                generator = torch.Generator(device=xi.device).manual_seed(example_seed(seed, idx))
                start = time.perf_counter()
                prediction, radius = smooth.certify(xi, n0, n, alpha, batch_size, generator=generator)
                row = {"idx": idx, "label": label, "predict": prediction, "radius": radius,
                       "correct": int(prediction == label), "time": time.perf_counter() - start}
                f.write(_format(row))
                f.flush()
                rows.append(row)
                bar.update(1)
        finally:
            bar.close()
    return rows


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a certification TSV; a partial last line (a run killed mid-write) is dropped."""
    rows, _ = _parse(Path(path))
    return rows


def certified_accuracy(rows: Sequence[Row], radii: Iterable[float]) -> dict[float, float]:
    """Certified accuracy at each r: the fraction of examples predicted correctly with radius ≥ r."""
    _nonempty(rows)
    correct = np.array([r["correct"] for r in rows], dtype=bool)
    radius = np.array([r["radius"] for r in rows], dtype=float)
    return {float(r): float(np.mean(correct & (radius >= r))) for r in radii}


def average_certified_radius(rows: Sequence[Row]) -> float:
    """ACR: the mean over examples of radius · 1[correct] (abstentions and errors count 0)."""
    _nonempty(rows)
    return float(np.mean([r["radius"] * bool(r["correct"]) for r in rows]))


def summary(rows: Sequence[Row], radii: Iterable[float] = DEFAULT_RADII) -> dict[str, float]:
    """MLflow-ready metrics: ``certified_accuracy_r0.25``-style keys, ``acr``, ``abstain_rate``,
    ``examples``."""
    out = {f"certified_accuracy_r{r:g}": acc for r, acc in certified_accuracy(rows, radii).items()}
    out["acr"] = average_certified_radius(rows)
    out["abstain_rate"] = float(np.mean([r["predict"] == ABSTAIN for r in rows]))
    out["examples"] = float(len(rows))
    return out


def plot_curves(curves: Mapping[str, Sequence[Row]], sigma: float, title: str = ""):
    """Certified accuracy against ℓ2 radius, one line per method (name -> its rows); a matplotlib Figure."""
    from core.runtime.plotting import figure

    if not curves:
        raise ValueError("plot_curves needs at least one method's rows")
    r_max = max([sigma] + [max((r["radius"] for r in rows), default=0.0) for rows in curves.values()])
    grid = np.linspace(0.0, 1.05 * r_max, 400)
    fig, ax = figure(figsize=(6, 4))
    for name, rows in curves.items():
        acc = certified_accuracy(rows, grid)
        ax.plot(grid, [acc[float(r)] for r in grid], label=name)
    ax.set_xlabel("radius (ℓ2)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(0.0, grid[-1])
    ax.set_title(f"{title}{' ' if title else ''}(σ = {sigma:g})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _nonempty(rows: Sequence[Row]) -> None:
    if len(rows) == 0:
        raise ValueError("no rows: certify at least one example before computing metrics")


# ----------------------------------------------------------------------------------------------------
# the TSV


def _format(row: Row) -> str:
    # repr(float) round-trips exactly, so a re-read row equals the row that was written
    return (f"{row['idx']}\t{row['label']}\t{row['predict']}\t{row['radius']!r}\t{row['correct']}\t"
            f"{row['time']:.4f}\n")


def _parse(path: Path) -> tuple[list[Row], int]:
    """Rows of complete lines, and the byte length of the header plus those lines."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")[:-1]   # the piece after the last newline is partial (or empty)
    if not lines or lines[0].decode("utf-8", "replace") + "\n" != HEADER:
        found = (lines[0] if lines else data)[:200].decode("utf-8", "replace")
        raise ValueError(f"{path} is not a certification table: expected the header {HEADER.strip()!r}, "
                         f"found {found!r}")
    rows: list[Row] = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.decode("utf-8").split("\t")
        try:
            if len(fields) != len(COLUMNS):
                raise ValueError(f"{len(fields)} fields")
            rows.append({"idx": int(fields[0]), "label": int(fields[1]), "predict": int(fields[2]),
                         "radius": float(fields[3]), "correct": int(fields[4]), "time": float(fields[5])})
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: bad row {line[:200]!r} ({e})") from None
    return rows, sum(len(line) + 1 for line in lines)


def _resume(path: Path, schedule: Sequence[int], y: Tensor | Sequence[int]) -> list[Row]:
    """The finished rows of an interrupted run at ``path`` (file truncated to them), or [] to start fresh."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        head = f.read(len(HEADER))
    if HEADER.encode("utf-8").startswith(head) and len(head) < len(HEADER):
        path.unlink()   # empty or a partial header: killed before the header was written
        return []
    try:
        rows, keep = _parse(path)
    except ValueError as e:
        raise ValueError(f"cannot resume: {e}; move it away or choose another output path") from None
    for k, row in enumerate(rows):
        if k >= len(schedule) or row["idx"] != schedule[k]:
            expected = schedule[k] if k < len(schedule) else "no more rows"
            raise ValueError(f"cannot resume {path}: row {k + 1} has idx {row['idx']}, this run's schedule "
                             f"expects {expected} (different skip or max_examples?)")
        if row["label"] != int(y[row["idx"]]):
            raise ValueError(f"cannot resume {path}: idx {row['idx']} has label {row['label']} in the table "
                             f"but {int(y[row['idx']])} in the data (a different split?)")
    if keep < path.stat().st_size:
        with open(path, "r+b") as f:   # drop the partial last line so appended rows start on a fresh line
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return rows

