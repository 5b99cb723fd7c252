"""Fast exact CGE: layer-level feature reuse, delta forward, batched perturbations, fused blocks.

:class:`FastCGE` (:mod:`core.engine.fast_cge`, with a worked trace of one coordinate) is the
engine; the rest, in the order one coordinate meets it:

- :mod:`core.engine.graph` — the traced graph, each node's :class:`~core.engine.graph.Op`, the fused
  blocks, each parameter's :class:`~core.engine.graph.Coord`;
- :mod:`core.engine.analysis` — what can be computed exactly (in-place updates, non-tensor values);
- :mod:`core.engine.forward` — the unperturbed caching forward and its check against the model;
- :mod:`core.engine.planning` — per-input-shape decisions (closed form or not, chunk sizes);
- :mod:`core.engine.step` — the cached values in the layouts the closed forms read;
- :mod:`core.engine.sources` — the perturbed value a coordinate makes at its layer;
- :mod:`core.engine.propagate` — the walk from there to the loss; :mod:`core.engine.reps` (compact
  perturbed activations), :mod:`core.engine.layers` (closed forms per layer),
  :mod:`core.engine.blocks` and :mod:`core.engine.windows` (fused conv → BN → ReLU → max-pool);
- :mod:`core.engine.losses` — K losses at once.

When the engine cannot analyse a model (an output that is not one tensor, a layer returning a
tuple, an in-place operation on a cached value, ...) it raises :class:`EngineUnsupported` naming
the layer and why; :class:`core.CGE` then falls back to the exact naive loop (``engine="auto"``)
or re-raises the message (``engine="fast"``).
"""


class EngineUnsupported(TypeError):
    """The fast CGE engine cannot analyse this model; the message names the layer and the reason."""


from core.engine.fast_cge import FastCGE, trace_model  # noqa: E402
from core.engine.graph import Coord, Op  # noqa: E402

__all__ = ["Coord", "EngineUnsupported", "FastCGE", "Op", "trace_model"]
