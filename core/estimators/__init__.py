"""ZO gradient estimators with an ordinary-PyTorch interface: ``loss = zo.backward(loss_fn, x, y)``."""
from core.estimators.base import ZOEstimator, batched_objective, frozen_buffers
from core.estimators.cge import CGE
from core.estimators.hybrid import Hybrid
from core.estimators.input_space import input_space_backward
from core.estimators.mezo import MeZO
from core.estimators.rge import RGE

__all__ = ["CGE", "RGE", "MeZO", "Hybrid", "ZOEstimator", "batched_objective", "frozen_buffers",
           "input_space_backward"]
