"""Devices the engine's exactness tests run on: the CPU always, CUDA when present (marked ``gpu``)."""
import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
