"""The tables and headless (Agg) matplotlib plots every run logs."""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any


def figure(**kwargs):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
              title: str = "", logx: bool = False, errors: Mapping[str, Sequence[float]] | None = None):
    """One line per entry of ``series`` (name -> (xs, ys)); optional error bars per name."""
    fig, ax = figure(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        if errors and name in errors:
            ax.errorbar(xs, ys, yerr=errors[name], marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1 or errors:
        ax.legend()
    fig.tight_layout()
    return fig


def tsv(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as a tab-separated table with a header (columns from the first row)."""
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, delimiter="\t", lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def log_history_plots(tracker, history: Sequence[dict[str, float]], metric: str, title: str,
                      prefix: str = "plots") -> None:
    """``metric`` against epoch, queries and wall time, as PNG artifacts ``<prefix>/<metric>_vs_*.png``."""
    history = [h for h in history if metric in h]
    if not history:
        return
    ys = [h[metric] for h in history]
    stem = "accuracy" if metric == "test_accuracy" else metric
    for key, label in (("epoch", "epoch"), ("queries", "queries (per-sample evaluations)"),
                       ("wall_time_s", "wall time (s)")):
        if key not in history[0]:
            continue
        name = "wall_time" if key == "wall_time_s" else key
        fig = line_plot({title: ([h[key] for h in history], ys)}, xlabel=label, ylabel=metric.replace("_", " "),
                        title=title)
        tracker.log_figure(fig, f"{prefix}/{stem}_vs_{name}.png")
