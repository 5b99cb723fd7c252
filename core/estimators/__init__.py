"""ZO gradient estimators with an ordinary-PyTorch interface: ``loss = zo.backward(loss_fn, x, y)``."""
from core.estimators.base import ZOEstimator, frozen_buffers, restore_on_error
from core.estimators.objectives import BatchedObjective, Objective, batched_objective, objective
from core.estimators.cge import CGE
from core.estimators.functional import call_stacked, stacked_forward
from core.estimators.hybrid import Hybrid
from core.estimators.input_space import input_space_backward
from core.estimators.mezo import MeZO
from core.estimators.rge import RGE

__all__ = ["CGE", "RGE", "MeZO", "Hybrid", "ZOEstimator", "objective", "batched_objective", "Objective",
           "BatchedObjective", "call_stacked", "stacked_forward", "frozen_buffers", "restore_on_error",
           "input_space_backward"]
