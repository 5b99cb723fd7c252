"""Certifying a split: the streamed TSV, resuming it after a kill, and the metrics read from it.

Oracles: an interrupted-then-resumed table equals an uninterrupted one (all columns but time), because
each example's noise is seeded from (seed, idx); metrics on hand-made rows are computed by hand.
"""
from __future__ import annotations

import pytest
import torch

from applications.certified_defense.certify import (
    COLUMNS,
    HEADER,
    average_certified_radius,
    certified_accuracy,
    certify_split,
    example_seed,
    plot_curves,
    read_rows,
    summary,
)
from applications.certified_defense.smoothing import ABSTAIN, Smooth

SETTINGS = {"n0": 10, "n": 200, "alpha": 0.01, "batch_size": 64, "progress": False}


class SignOfFirst:
    """f(z) = 1[z₀ > 0] on 2-D points; counts the points it classifies."""

    def __init__(self) -> None:
        self.queries = 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.queries += z.shape[0]
        return (z[:, 0] > 0).long()


def points() -> tuple[torch.Tensor, torch.Tensor]:
    """8 points at varying distance from the boundary (some abstain, some are misclassified)."""
    x0 = torch.tensor([0.5, -0.3, 0.05, 0.0, -0.6, 0.2, -0.02, 0.4])
    x = torch.stack([x0, torch.zeros_like(x0)], dim=1)
    y = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0])
    return x, y


def _drop_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _run(path, **kwargs):
    f = SignOfFirst()
    x, y = points()
    rows = certify_split(Smooth(f, 2, 0.25, labels_only=True), x, y, path, **(SETTINGS | kwargs))
    return rows, f.queries


def test_rows_follow_the_schedule_and_are_streamed_with_a_header(tmp_path):
    rows, _ = _run(tmp_path / "t.tsv", skip=3)
    assert [r["idx"] for r in rows] == [0, 3, 6]
    text = (tmp_path / "t.tsv").read_text()
    assert text.startswith(HEADER) and text.count("\n") == 1 + 3
    assert list(rows[0]) == list(COLUMNS)
    assert _drop_time(read_rows(tmp_path / "t.tsv")) == _drop_time(rows)
    for r in rows:
        assert r["correct"] == int(r["predict"] == r["label"])
        assert (r["radius"] == 0.0) if r["predict"] == ABSTAIN else (r["radius"] >= 0.0)
    rows, _ = _run(tmp_path / "m.tsv", skip=2, max_examples=2)
    assert [r["idx"] for r in rows] == [0, 2]


@pytest.mark.parametrize("cut", ["header", "partial_header", "two_rows", "partial_row", "complete", "empty"])
def test_an_interrupted_table_resumes_to_the_uninterrupted_one(tmp_path, cut):
    full, full_queries = _run(tmp_path / "full.tsv")
    text = (tmp_path / "full.tsv").read_text()
    lines = text.splitlines(keepends=True)
    killed = {
        "empty": "",
        "partial_header": HEADER[:7],
        "header": lines[0],
        "two_rows": "".join(lines[:3]),
        "partial_row": "".join(lines[:4]) + lines[4][:5],          # killed mid-write of the 4th row
        "complete": text,
    }[cut]
    path = tmp_path / "resumed.tsv"
    path.write_text(killed)
    done = {"empty": 0, "partial_header": 0, "header": 0, "two_rows": 2, "partial_row": 3, "complete": 8}[cut]

    resumed, queries = _run(path)

    assert _drop_time(resumed) == _drop_time(full)
    assert _drop_time(read_rows(path)) == _drop_time(full)
    strip = [line.rsplit("\t", 1)[0] for line in path.read_text().splitlines()]
    assert strip == [line.rsplit("\t", 1)[0] for line in text.splitlines()]   # the file too, byte for byte
    assert queries == full_queries * (8 - done) // 8                          # finished rows are not redone


def test_resume_refuses_a_foreign_file_or_a_different_schedule(tmp_path):
    foreign = tmp_path / "notes.tsv"
    foreign.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a certification table"):
        _run(foreign)
    _run(tmp_path / "t.tsv", max_examples=3)
    with pytest.raises(ValueError, match="skip"):
        _run(tmp_path / "t.tsv", skip=2)
    _run(tmp_path / "t.tsv")   # extending max_examples with the same skip is fine
    assert len(read_rows(tmp_path / "t.tsv")) == 8


def test_example_seeds_depend_on_seed_and_idx_only():
    assert example_seed(0, 5) == example_seed(0, 5)
    assert len({example_seed(s, i) for s in range(3) for i in range(100)}) == 300
    assert torch.Generator().manual_seed(example_seed(2**40, 10**9))   # fits torch's seed range


def test_different_seeds_give_different_noise(tmp_path):
    a, _ = _run(tmp_path / "a.tsv", seed=0)
    b, _ = _run(tmp_path / "b.tsv", seed=1)
    assert [r["radius"] for r in a] != [r["radius"] for r in b]


# ------------------------------------------------------------------------------------------------
# metrics


HAND_MADE = [
    {"idx": 0, "label": 1, "predict": 1, "radius": 0.9, "correct": 1, "time": 0.1},
    {"idx": 1, "label": 2, "predict": 2, "radius": 0.3, "correct": 1, "time": 0.1},
    {"idx": 2, "label": 0, "predict": 3, "radius": 0.7, "correct": 0, "time": 0.1},   # wrong, however robust
    {"idx": 3, "label": 4, "predict": ABSTAIN, "radius": 0.0, "correct": 0, "time": 0.1},
    {"idx": 4, "label": 5, "predict": 5, "radius": 0.0, "correct": 1, "time": 0.1},   # pABar = 1/2 exactly
]


def test_certified_accuracy_on_hand_made_rows():
    assert certified_accuracy(HAND_MADE, [0.0, 0.25, 0.3, 0.5, 0.9, 1.0]) == {
        0.0: 3 / 5, 0.25: 2 / 5, 0.3: 2 / 5, 0.5: 1 / 5, 0.9: 1 / 5, 1.0: 0.0}


def test_average_certified_radius_on_hand_made_rows():
    assert average_certified_radius(HAND_MADE) == pytest.approx((0.9 + 0.3) / 5)


def test_summary_has_mlflow_ready_names():
    s = summary(HAND_MADE, radii=(0.0, 0.25, 0.5, 0.75))
    assert s == pytest.approx({"certified_accuracy_r0": 0.6, "certified_accuracy_r0.25": 0.4,
                               "certified_accuracy_r0.5": 0.2, "certified_accuracy_r0.75": 0.2,
                               "acr": 0.24, "abstain_rate": 0.2, "examples": 5.0})


def test_metrics_refuse_no_rows():
    with pytest.raises(ValueError, match="no rows"):
        certified_accuracy([], [0.0])


def test_plot_has_one_decreasing_line_per_method():
    shifted = [r | {"radius": r["radius"] / 2} for r in HAND_MADE]
    fig = plot_curves({"FO-DS": HAND_MADE, "ZO-DS": shifted}, sigma=0.25, title="CIFAR-10")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["FO-DS", "ZO-DS"]
    for line in ax.get_lines():
        ys = list(line.get_ydata())
        assert ys[0] == pytest.approx(0.6) and ys == sorted(ys, reverse=True)
    assert "0.25" in ax.get_title()
