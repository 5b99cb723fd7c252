"""deepzero core: zeroth-order estimators, sparsity, the fast CGE engine, BlackBox, and the runtime."""
from core.blackbox import BlackBox, BudgetExceeded, NotDifferentiable
from core.estimators import CGE, ZOEstimator, batched_objective

__all__ = ["CGE", "BlackBox", "BudgetExceeded", "NotDifferentiable", "ZOEstimator", "batched_objective"]
