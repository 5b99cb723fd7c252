"""The applications as a user runs them on a GPU (``--device cuda``): skipped without CUDA.

Each runs a smoke preset end to end on the GPU, so a tensor left on the CPU anywhere on the way
(the target, the teacher, the certification data, a generator, a checkpoint's state) fails here.
"""
import signal

import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_ranks_train_and_a_hung_rank_stops_the_run_in_one_line(tmp_path):
    from tests.core.runtime.test_launch import _interrupt_rank, _stop_line

    proc, _, took = _interrupt_rank(tmp_path, 1, signal.SIGSTOP, "--device", "cuda", "--dist-timeout", "5",
                                    env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"})
    line = _stop_line(proc)                  # NCCL's blocking wait: a Python error in rank 0, not SIGABRT
    assert "lost contact with rank 1" in line and "the checkpoint of epoch 1 is kept" in line, line
    assert took < 5 + 3 + 25, took


def test_defense_runs_certifies_and_verifies_on_a_gpu(tmp_path):
    proc = deepzero("defense", "run", "--preset", "smoke", "--device", "cuda", "--no-progress", home=tmp_path,
                    timeout=900)
    assert proc.returncode == 0, proc.stderr
    (target,) = (tmp_path / "runs" / "defense").rglob("target-*.pt")
    denoiser = sorted((tmp_path / "runs" / "defense").glob("*/checkpoint.pt"))[0]
    for verb in (["certify", str(denoiser), "--target", str(target), "--no-progress"],
                 ["verify", "--target", str(target), "--samples", "2"]):
        out = deepzero("defense", *verb, "--preset", "smoke", "--device", "cuda", home=tmp_path, timeout=600)
        assert out.returncode == 0, (verb, out.stderr)


def test_kd_runs_on_a_gpu(tmp_path):
    proc = deepzero("kd", "run", "--preset", "smoke", "--set", "run.device=cuda", "--no-progress", home=tmp_path,
                    timeout=900)
    assert proc.returncode == 0, proc.stderr
