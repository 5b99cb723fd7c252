"""Headless (Agg) matplotlib helpers for the plots every run logs."""
from __future__ import annotations

from collections.abc import Mapping, Sequence


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
