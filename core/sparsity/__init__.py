"""Sparse ZO training: ZO-GraSP layer-wise pruning ratios, baselines, and the per-layer mask plan."""
from core.sparsity.masks import (SparsityPlan, load_ratios, magnitude_ratios, prunable, random_ratios,
                                 save_ratios)
from core.sparsity.zo_grasp import zo_grasp_ratios, zo_grasp_scores

__all__ = ["SparsityPlan", "zo_grasp_ratios", "zo_grasp_scores", "random_ratios", "magnitude_ratios",
           "prunable", "save_ratios", "load_ratios"]
