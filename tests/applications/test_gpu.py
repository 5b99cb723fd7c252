"""The applications as a user runs them on a GPU (``--device cuda``): skipped without CUDA.

Each runs a smoke preset end to end on the GPU, so a tensor left on the CPU anywhere on the way
(the target, the teacher, the certification data, a generator, a checkpoint's state) fails here.
"""
import signal

import pytest
import torch

from tests.core.runtime.test_launch import linux_only
from tests.helpers import deepzero

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_classify_trains_and_resumes_on_a_gpu(tmp_path):
    from core.runtime.checkpoint import load_checkpoint

    proc = deepzero("classify", "train", "--preset", "smoke", "--device", "cuda", "--set", "optim.epochs=1",
                    "--no-progress", home=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (ckpt,) = (tmp_path / "runs" / "classify").glob("*/checkpoint.pt")
    proc = deepzero("classify", "train", "--resume", str(ckpt), "--set", "optim.epochs=2", "--no-progress",
                    home=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(ckpt)["epoch"] == 2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@linux_only
def test_two_nccl_ranks_train_and_a_hung_rank_stops_the_run_in_one_line(tmp_path):
    from tests.core.runtime.test_launch import _interrupt_rank

    proc, _, took = _interrupt_rank(tmp_path, 1, signal.SIGSTOP, "--device", "cuda", "--dist-timeout", "5",
                                    env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"})
    # NCCL's blocking wait: a Python error in rank 0 and the stop line, not the watchdog's SIGABRT (NCCL's
    # own log lines may come before it)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert any("lost contact with rank 1" in line and "the checkpoint of epoch 1 is kept" in line
               for line in proc.stderr.splitlines()), proc.stderr
    assert "--resume" in proc.stderr and took < 5 + 3 + 25, took


def test_defense_runs_certifies_and_verifies_on_a_gpu(tmp_path):
    proc = deepzero("defense", "run", "--preset", "smoke", "--device", "cuda", "--no-progress", home=tmp_path,
                    timeout=900)
    assert proc.returncode == 0, proc.stderr
    from core.runtime.checkpoint import load_checkpoint

    (target,) = (tmp_path / "runs" / "defense").rglob("target-*.pt")
    denoisers = {load_checkpoint(p)["config"]["optim"]["method"]: p
                 for p in (tmp_path / "runs" / "defense").glob("*/checkpoint.pt")}
    for verb in (["certify", str(denoisers["zo-ae-ds"]), "--target", str(target), "--no-progress"],
                 ["verify", "--target", str(target), "--denoiser", str(denoisers["zo-ds"]), "--samples", "2"]):
        out = deepzero("defense", *verb, "--preset", "smoke", "--device", "cuda", home=tmp_path, timeout=600)
        assert out.returncode == 0, (verb, out.stderr)


def test_kd_runs_on_a_gpu(tmp_path):
    proc = deepzero("kd", "run", "--preset", "smoke", "--set", "run.device=cuda", "--no-progress", home=tmp_path,
                    timeout=900)
    assert proc.returncode == 0, proc.stderr
