import pickle

import numpy as np
import pytest
import torch

from core.runtime.data import load_cifar10, load_dataset, load_imagefolder
from core.runtime.errors import UserError


def test_mnist_is_the_real_shipped_digits_with_a_fixed_stratified_split():
    a, b = load_dataset("mnist"), load_dataset("mnist")
    assert len(a.train) == 4000 and len(a.test) == 1000 and a.input_shape == (1, 28, 28)
    assert torch.equal(a.test.y, b.test.y)
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 90 and counts.max() <= 115            # stratified: ~100 per class
    assert abs(float(a.train.x.mean())) < 0.2 and abs(float(a.train.x.std()) - 1) < 0.2


def test_digits():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and len(d.train) + len(d.test) == 1797


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


def test_missing_or_wrong_data_directories_say_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match="needs --data-root"):
        load_cifar10(None)
    with pytest.raises(UserError, match="--data-root not found"):
        load_cifar10(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"cifar-10-batches-py/ with data_batch_1..5"):
        load_cifar10(str(tmp_path))
    with pytest.raises(UserError, match=r"train/<class name>"):
        load_imagefolder(str(tmp_path))


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((20, 20, 3), 40 * i + (c == "dog") * 100, dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.png")
    d = load_imagefolder(str(tmp_path), image_size=16)
    assert d.num_classes == 2 and d.train.x.shape == (4, 3, 16, 16) and d.test.y.tolist() == [0, 0, 1, 1]
