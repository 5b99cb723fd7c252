"""Fast exact CGE: layer-level feature reuse, delta forward and batched perturbations.

See :class:`core.engine.fast_cge.FastCGE` (the engine), :mod:`core.engine.delta` (compact perturbed
activations and each layer's closed form), :mod:`core.engine.analysis` (what can be computed exactly:
in-place updates, non-tensor values, the graph against the model) and :mod:`core.engine.losses`
(K losses at once). When the engine cannot analyse a model (an output that
is not one tensor, a layer returning a tuple, an in-place operation on a cached value, ...) it
raises :class:`EngineUnsupported` naming the layer and why; :class:`core.CGE` then falls back to
the exact naive loop (``engine="auto"``) or re-raises the message (``engine="fast"``).
"""


class EngineUnsupported(TypeError):
    """The fast CGE engine cannot analyse this model; the message names the layer and the reason."""


from core.engine.fast_cge import FastCGE, trace_model  # noqa: E402

__all__ = ["EngineUnsupported", "FastCGE", "trace_model"]
