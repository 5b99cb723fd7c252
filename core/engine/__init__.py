"""Fast exact CGE: layer-level feature reuse, delta forward and batched perturbations.

See :class:`core.engine.fast_cge.FastCGE`.
"""
from core.engine.fast_cge import FastCGE, trace_model

__all__ = ["FastCGE", "trace_model"]
