from core.estimators.base import ZOEstimator, batched_objective, frozen_buffers
from core.estimators.cge import CGE

__all__ = ["CGE", "ZOEstimator", "batched_objective", "frozen_buffers"]
