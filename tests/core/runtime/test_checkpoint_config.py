import pickle
from dataclasses import dataclass, field

import pytest
import torch

from core.runtime.checkpoint import load_checkpoint, save_checkpoint
from core.runtime.config import build_config, flatten
from core.runtime.errors import UserError
from core.runtime.seeding import get_rng_state, seed_everything, set_rng_state
from tests.core.devices import DEVICES


def test_checkpoint_round_trip_with_rng_states(tmp_path):
    seed_everything(3)
    state = {"app": "x", "model": {"w": torch.randn(3)}, "rng": get_rng_state(), "step": 7}
    expected = (torch.rand(2), __import__("numpy").random.rand(), __import__("random").random())
    path = save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(path, app="x")
    set_rng_state(loaded["rng"])
    got = (torch.rand(2), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
    assert loaded["step"] == 7 and [p.name for p in tmp_path.iterdir()] == ["c.pt"]   # no temp files left


@pytest.mark.parametrize("device", DEVICES)
def test_the_run_devices_generator_is_saved_and_restored_into_the_resumes_device(tmp_path, device):
    """Only the run's GPU generator is saved (a resume may see fewer GPUs), in the checkpoint's
    weights-only format, and restored into the GPU the resume runs on; a checkpoint with one state
    per GPU (the earlier format) restores its first."""
    seed_everything(5)
    state = get_rng_state(device)
    assert ("cuda" in state) == (device == "cuda")
    expected = torch.rand(3, device=device)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", {"app": "x", "rng": state}), app="x")["rng"]
    set_rng_state(loaded, device)
    assert torch.equal(torch.rand(3, device=device), expected)
    if device == "cuda":
        set_rng_state({**loaded, "cuda": [loaded["cuda"]] * (torch.cuda.device_count() + 3)}, device)
        assert torch.equal(torch.rand(3, device=device), expected)


def test_corrupt_and_foreign_checkpoints_are_clear_errors_and_untouched(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(corrupt)
    assert corrupt.read_bytes() == b"\x80\x02garbage"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="unreadable: corrupt, truncated, or holding objects"):
        load_checkpoint(foreign)
    other = save_checkpoint(tmp_path / "other.pt", {"app": "pde"})
    with pytest.raises(UserError, match="written by app 'pde'"):
        load_checkpoint(other, app="classify")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(UserError, match="not a deepzero checkpoint"):
        load_checkpoint(plain)


@dataclass
class Inner:
    lr: float = 0.1
    name: str = "a"


@dataclass
class Outer:
    train: Inner = field(default_factory=Inner)
    seed: int = 0


def test_config_overrides_types_and_unknown_keys(tmp_path):
    cfg = build_config(Outer, overrides=["train.lr=0.5", "seed=3"])
    assert cfg.train.lr == 0.5 and cfg.seed == 3 and isinstance(cfg, Outer)
    assert flatten(cfg) == {"train.lr": 0.5, "train.name": "a", "seed": 3}
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr'.*valid keys here: lr, name"):
        build_config(Outer, overrides=["train.lrr=1"])
    with pytest.raises(UserError, match=r"bad value for config key 'train.lr'"):
        build_config(Outer, overrides=["train.lr=fast"])
    with pytest.raises(UserError, match="expected key=value"):
        build_config(Outer, overrides=["train.lr"])
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 0.01}\nbogus: 1\n")
    with pytest.raises(UserError, match="unknown config key 'bogus'"):
        build_config(Outer, config_file=str(f))
    with pytest.raises(UserError, match="unknown preset 'nope'; available presets: a, b"):
        (tmp_path / "a.yaml").write_text("seed: 1\n")
        (tmp_path / "b.yaml").write_text("seed: 2\n")
        build_config(Outer, preset_dir=tmp_path, preset="nope")
    assert build_config(Outer, preset_dir=tmp_path, preset="b").seed == 2


def test_base_layer_is_applied_before_overrides():
    cfg = build_config(Outer, base={"train": {"lr": 0.3, "name": "b"}, "seed": 5}, overrides=["seed=6"])
    assert (cfg.train.lr, cfg.train.name, cfg.seed) == (0.3, "b", 6)
