import pytest
import torch
import torch.nn.functional as F

from core import SparsityPlan, magnitude_ratios, random_ratios, zo_grasp_ratios
from core.sparsity import load_ratios, prunable, save_ratios, zo_grasp_scores
from tests.core.toy_models import small_cnn


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 5, (20,), generator=g)


def _weighted_mean(model, ratios):
    sizes = {n: p.numel() for n, p in prunable(model).items()}
    return sum(ratios[n] * sizes[n] for n in ratios) / sum(sizes.values())


def test_zo_grasp_ratios_reproducible_and_hit_target_sparsity():
    torch.manual_seed(0)
    model = small_cnn()
    x, y = _data()
    r1 = zo_grasp_ratios(model, F.cross_entropy, x, y, 0.9, q=16, generator=torch.Generator().manual_seed(1))
    r2 = zo_grasp_ratios(model, F.cross_entropy, x, y, 0.9, q=16, generator=torch.Generator().manual_seed(1))
    assert r1 == r2
    assert set(r1) == set(prunable(model))
    assert abs(_weighted_mean(model, r1) - 0.9) < 1.0 / sum(p.numel() for p in prunable(model).values()) + 1e-12
    assert len(set(round(v, 4) for v in r1.values())) > 1   # non-uniform: it is not the random baseline


def test_common_random_numbers_lower_score_variance():
    torch.manual_seed(0)
    model = small_cnn().double()
    x, y = _data()
    x = x.double()

    def spread(crn):
        runs = [torch.cat([s.reshape(-1) for s in zo_grasp_scores(
            model, F.cross_entropy, x, y, q=8, generator=torch.Generator().manual_seed(s),
            common_random_numbers=crn).values()]) for s in range(6)]
        return torch.stack(runs).var(dim=0).mean()

    assert spread(True) < 0.1 * spread(False)


def test_plan_masks_match_ratios_refresh_and_resume():
    torch.manual_seed(0)
    model = small_cnn()
    ratios = magnitude_ratios(model, 0.7)
    plan = SparsityPlan(model, ratios, refresh_every=2, seed=4)
    for name, m in plan.masks().items():
        n = m.numel()
        assert int(m.sum()) == n - round(ratios[name] * n)
    first = {n: m.clone() for n, m in plan.masks().items()}
    plan.step()
    assert all(torch.equal(first[n], m) for n, m in plan.masks().items())
    plan.step()
    assert not all(torch.equal(first[n], m) for n, m in plan.masks().items())
    state = plan.state_dict()
    plan.step(); plan.step()
    expected = {n: m.clone() for n, m in plan.masks().items()}
    other = SparsityPlan(model, ratios, refresh_every=2, seed=99)
    other.load_state_dict(state)
    other.step(); other.step()
    assert all(torch.equal(expected[n], m) for n, m in other.masks().items())
    assert "0.bias" not in plan.masks() and "1.weight" not in plan.masks()   # bias and BN stay dense


def test_ratio_files_round_trip_and_reject_garbage(tmp_path):
    model = small_cnn()
    ratios = random_ratios(model, 0.5)
    path = save_ratios(tmp_path / "r.json", ratios, {"method": "random"})
    assert load_ratios(path, model) == ratios
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="not a deepzero ratios file"):
        load_ratios(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ratios(tmp_path / "missing.json")
