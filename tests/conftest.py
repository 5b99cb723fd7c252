import os
import shutil
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The parsed shipped data sets (core.runtime.data.cache_dir) live in one folder per test session,
# shared with the commands the tests start and removed at the end; never the user's own cache.
_CACHE = tempfile.mkdtemp(prefix="deepzero-test-cache-")
os.environ["DEEPZERO_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


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
