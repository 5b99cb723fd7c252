"""Hinton's KD loss against a hand computation, the logits cache, and each halting policy on synthetic curves."""
import math

import pytest
import torch
import torch.nn.functional as F

from applications.edge_kd.halting import EpochHalting, LayerFreezing, SampleDropping, TeacherHalting
from applications.edge_kd.kd import LogitsCache, kd_loss
from core import BlackBox


def _hand_kd(z_s, y, z_t, alpha, T, has=None):
    """Hinton et al. 2015 written out with Python loops: per sample, KL summed over classes; mean over the batch."""
    total = 0.0
    for b in range(len(y)):
        zs, zt = z_s[b].tolist(), z_t[b].tolist()
        ls = math.log(sum(math.exp(v) for v in zs))
        ce = ls - zs[int(y[b])]
        ps = [math.exp(v / T) for v in zs]
        pt = [math.exp(v / T) for v in zt]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kl = sum(t * (math.log(t) - math.log(s)) for t, s in zip(pt, ps))
        a = alpha if has is None or has[b] else 1.0
        total += a * ce + (1 - a) * T * T * kl
    return total / len(y)


def test_kd_loss_equals_the_hand_computation_with_batchmean():
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3, torch.randn(5, 4, generator=g,
                                                                                   dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 1, 1, 2])
    for alpha, T in ((0.5, 4.0), (0.0, 2.0), (1.0, 1.0), (0.3, 0.5)):
        got = float(kd_loss(z_s, y, z_t, alpha=alpha, temperature=T))
        assert got == pytest.approx(_hand_kd(z_s, y, z_t, alpha, T), rel=1e-12)
    # the same as torch's KL with reduction='batchmean'; 'mean' would divide the soft term by K = 4 too
    kl = F.kl_div(F.log_softmax(z_s / 4, 1), F.softmax(z_t / 4, 1), reduction="batchmean")
    ref = 0.5 * F.cross_entropy(z_s, y) + 0.5 * 16 * kl
    assert float(kd_loss(z_s, y, z_t, alpha=0.5, temperature=4.0)) == pytest.approx(float(ref), rel=1e-12)
    with pytest.warns(UserWarning, match="batchmean"):          # torch itself warns about 'mean'
        soft = F.kl_div(F.log_softmax(z_s / 4, 1), F.softmax(z_t / 4, 1), reduction="mean")
    wrong = 0.5 * F.cross_entropy(z_s, y) + 0.5 * 16 * soft
    assert float(wrong) < float(ref) - 0.1
    # samples without a teacher answer are trained on their labels alone (alpha = 1 for those rows)
    has = torch.tensor([True, False, True, False, True])
    got = float(kd_loss(z_s, y, z_t, alpha=0.5, temperature=4.0, has_teacher=has))
    assert got == pytest.approx(_hand_kd(z_s, y, z_t, 0.5, 4.0, has.tolist()), rel=1e-12)


def test_the_cache_queries_the_teacher_once_per_sample():
    x = torch.randn(10, 3)
    w = torch.randn(3, 4)
    box = BlackBox(lambda t: t @ w, name="teacher")
    cache = LogitsCache(10, 4)
    for idx in (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]), torch.tensor([9, 0, 5])):
        z, has = cache.fetch(idx, x[idx], box)
        assert bool(has.all()) and torch.allclose(z, x[idx] @ w)
    assert box.queries == 7 and cache.cached == 7                    # samples 0-5 and 9, once each
    z, has = cache.fetch(torch.tensor([6, 0]), x[[6, 0]], None)      # the teacher is no longer asked
    assert has.tolist() == [False, True] and box.queries == 7 and torch.equal(z[0], torch.zeros(4))


def test_epoch_halting_on_a_plateau_and_at_rho_times_the_teacher():
    p = EpochHalting(patience=2, min_delta=0.002, rho=0.0, teacher_accuracy=0.95)
    curve = [0.50, 0.70, 0.800, 0.801, 0.802, 0.9]
    decisions = [p.decide(a) for a in curve[:5]]
    assert decisions == [False, False, False, False, True]            # 0.801, 0.802: not > 0.800 + 0.002
    assert "no validation improvement" in p.reason
    p = EpochHalting(patience=2, min_delta=0.0, rho=0.99, teacher_accuracy=0.95)
    assert [p.decide(a) for a in (0.90, 0.93, 0.9405)] == [False, False, True]   # 0.99 * 0.95 = 0.9405
    q = EpochHalting(patience=2, min_delta=0.0, rho=0.99, teacher_accuracy=0.95)
    q.load_state_dict(p.state_dict())
    assert q.best == p.best and q.reason == p.reason


def test_sample_dropping_after_patience_learned_visits():
    p = SampleDropping(4, confidence=0.8, patience=2, max_fraction=0.5)
    y = torch.tensor([0, 1, 2, 3])
    sure = torch.eye(4)                                               # every sample learned
    probs = sure.clone()
    probs[1] = torch.tensor([0.1, 0.7, 0.1, 0.1])                     # sample 1: right but not confident
    assert p.decide(torch.arange(4), probs, y).tolist() == []         # first learned visit: streak 1
    assert p.streak.tolist() == [1, 0, 1, 1]
    probs[2] = torch.tensor([0.0, 0.9, 0.1, 0.0])                     # sample 2 forgotten: streak resets
    dropped = p.decide(torch.arange(4), probs, y)
    assert dropped.tolist() == [0, 3] and p.kept.tolist() == [False, True, True, False]
    assert p.decide(torch.arange(4), sure, y).tolist() == []         # max_fraction 0.5: no room left
    assert int((~p.kept).sum()) == 2


def test_teacher_halting_when_recent_agreement_is_high():
    p = TeacherHalting(agreement=0.75, window=8)
    assert p.decide(torch.tensor([True] * 7)) is False                      # 7 samples: the window is not full
    assert p.decide(torch.tensor([False, False, False])) is False           # last 8: 5 of 8 agree
    p = TeacherHalting(agreement=0.75, window=4)
    assert p.decide(torch.tensor([True, False, True, False])) is False      # 2/4
    assert p.decide(torch.tensor([True])) is False                          # last 4: F, T, F, T = 2/4
    assert p.decide(torch.tensor([True])) is True                           # last 4: T, F, T, T = 3/4 (inclusive)
    assert p.decide(torch.tensor([False] * 8)) is True                      # halted for good
    q = TeacherHalting(agreement=0.75, window=4)
    q.load_state_dict(p.state_dict())
    assert q.halted


def test_layer_freezing_freezes_a_converged_prefix_only():
    p = LayerFreezing(4, tol=0.1, patience=2)
    assert p.decide([0.05, 0.5, 0.01, 0.01]) == 0                   # calm once: not yet
    assert p.decide([0.05, 0.5, 0.01, 0.01]) == 1                   # unit 0 calm twice; unit 1 moves: prefix stops
    assert p.decide([0.5, 0.05, 0.05, 0.05]) == 1                   # a frozen unit stays frozen
    assert p.decide([0.0, 0.05, 0.05, 0.05]) == 3                   # units 1, 2 calm twice; the head always trains
    with pytest.raises(ValueError, match="expected 4"):
        p.decide([0.1])


def test_a_forward_only_mezo_step_measures_at_most_a_third_of_backprops_memory():
    """The issue's memory target, measured (PyTorch profiler, everything the step allocates) on the
    student the default preset designs for the Raspberry Pi 4 (depth 3, width 16), batch 64, KD loss."""
    from applications.edge_kd import learners
    from applications.edge_kd.config import PRESET_DIR, KDAppConfig
    from applications.edge_kd.train import kd_objective
    from core.models import build_model, model_spec, with_normalize
    from core.runtime.config import build_config

    cfg = build_config(KDAppConfig, preset_dir=PRESET_DIR, preset="default", overrides=[])
    spec = model_spec(with_normalize(build_model("cnn", depth=3, width=16, in_channels=1, num_classes=10),
                                     {"mean": [0.1307], "std": [0.3081]}))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=g)
    target = (torch.randint(0, 10, (64,), generator=g), torch.randn(64, 10, generator=g), None)
    fo, mezo = (learners.step_memory(spec, m, kd_objective(cfg), x, target, zo=cfg.zo, optim=cfg.optim)
                for m in ("fo", "zo-mezo"))
    assert mezo <= fo / 3, (mezo, fo)
