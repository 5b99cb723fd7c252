import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    from core.runtime.perf import tune_allocator

    torch.set_num_threads(1)
    tune_allocator()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An isolated embedded tracking store (sqlite + artifacts) under tmp_path."""
    monkeypatch.setenv("DEEPZERO_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
