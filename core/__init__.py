"""deepzero core: zeroth-order estimators, sparsity, the fast CGE engine, BlackBox, and the runtime.

Typical use reads like ordinary PyTorch with ``loss.backward()`` replaced::

    from core import CGE
    zo = CGE(model, mu=5e-3)
    loss = zo.backward(F.cross_entropy, x, y)   # fills p.grad
    optimizer.step()
"""
from core.blackbox import BlackBox, BudgetExceeded, NotDifferentiable
from core.estimators import (CGE, RGE, BatchedObjective, Hybrid, MeZO, Objective, ZOEstimator,
                             batched_objective, call_stacked, frozen_buffers, input_space_backward, objective,
                             restore_on_error, stacked_forward)
from core.sparsity import SparsityPlan, magnitude_ratios, random_ratios, zo_grasp_ratios

__all__ = ["CGE", "RGE", "MeZO", "Hybrid", "BlackBox", "BudgetExceeded", "NotDifferentiable", "ZOEstimator",
           "objective", "batched_objective", "Objective", "BatchedObjective", "call_stacked",
           "stacked_forward", "frozen_buffers", "restore_on_error", "input_space_backward", "SparsityPlan",
           "zo_grasp_ratios", "random_ratios", "magnitude_ratios"]
