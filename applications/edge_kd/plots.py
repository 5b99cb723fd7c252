"""The main job's figures: accuracy against training FLOPs and wall time, and memory per training step."""
from __future__ import annotations

from collections.abc import Mapping, Sequence


def curves(histories: Mapping[str, Sequence[dict]], key: str, *, xlabel: str, title: str, logx: bool = False):
    """Test accuracy against ``key`` (``train_flops`` or ``wall_time_s``) after each epoch, one line per run.

    Runs without halting are solid, halting runs dashed.
    """
    from core.runtime.plotting import figure

    fig, ax = figure(figsize=(7, 4.5))
    for name, hist in histories.items():
        xs = [h[key] for h in hist]
        ys = [h["test_accuracy"] for h in hist]
        ax.plot(xs, ys, marker="o", markersize=3, linestyle="-" if name.endswith("-none") else "--", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def memory_bars(measured: Mapping[str, float], *, title: str):
    """Measured peak memory of one training step per method (MiB), as bars with their values."""
    from core.runtime.plotting import figure

    fig, ax = figure(figsize=(5, 3.5))
    names = list(measured)
    values = [measured[n] / 2**20 for n in names]
    bars = ax.bar(names, values, color=["tab:red" if n == "fo" else "tab:blue" for n in names])
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("peak memory per training step (MiB)")
    ax.set_title(title)
    fig.tight_layout()
    return fig
