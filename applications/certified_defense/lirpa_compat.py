"""Import auto-LiRPA (PyPI 0.3) on today's NumPy 2 and torch 2.14, through compatibility patches.

auto-LiRPA 0.3 (Xu et al. 2020, "Automatic Perturbation Analysis for Scalable Certified Robustness
and Beyond", NeurIPS, arXiv:2002.12920) was written against NumPy 1 and the TorchScript-based ONNX
exporter of torch 1.x/2.0. It traces a model with ``torch.jit._get_trace_graph``, lowers the trace to
ONNX ops with ``torch.onnx.utils._optimize_graph`` and reads each node's attributes. Three things it
uses have since moved or gone away. Each patch below was found by importing auto-LiRPA and bounding a
model here (the tests in ``tests/applications/certified_defense/test_verify.py`` exercise all three):

1. ``numpy.lib.arraysetops`` — ``auto_LiRPA/operators/base.py`` does ``from numpy.lib.arraysetops
   import isin``. NumPy 2 made that module private (``numpy.lib._arraysetops_impl``), so the import
   fails with ``ModuleNotFoundError`` and nothing of auto-LiRPA loads. Patch: register a small module
   ``numpy.lib.arraysetops`` in ``sys.modules`` that exposes ``numpy.isin`` (the same function).
2. ``torch.onnx.symbolic_helper._set_opset_version`` — ``auto_LiRPA/parse_graph.py`` imports it at
   module level and calls ``_set_opset_version(12)`` before ``_optimize_graph``. torch 2.9+ moved the
   TorchScript exporter to ``torch.onnx._internal.torchscript_exporter`` and the public
   ``symbolic_helper`` shim no longer has that function (``ImportError``). Patch: put back a function
   that does what the old one did, set ``GLOBALS.export_onnx_opset_version`` on the exporter's
   globals (``torch.onnx._internal.torchscript_exporter._globals``), which ``_optimize_graph``'s
   symbolic functions read.
3. ``torch._C.Node.__getitem__`` — ``parse_graph.parse_graph`` reads attributes as ``n[k]`` for
   ``k in n.attributeNames()``. torch dropped the Python ``__getitem__`` that the old
   ``torch.onnx.utils`` monkey-patched onto ``torch._C.Node`` (``TypeError: 'torch._C.Node' object is
   not subscriptable``). Patch: ``torch._C.Node.__getitem__ = torch.onnx.symbolic_helper._node_get``,
   the helper that torch's own exporter still uses for the same job (it dispatches on
   ``node.kindOf(key)`` to ``node.f/i/s/t/fs/is/...``).

Nothing else was needed for Linear, Conv2d, BatchNorm2d (eval), ReLU, MaxPool2d, AvgPool2d, Flatten,
the residual subtraction of DnCNN and the broadcast affine of :class:`core.models.Normalize` with
IBP, CROWN and alpha-CROWN on CPU (NumPy 2 has ``np.bool`` again, which ``perturbations.py`` uses;
``appdirs``/``packaging``/``tqdm`` are in the environment even though 0.3 was installed ``--no-deps``).

Every patch is applied only if the thing it replaces is missing, so the module is idempotent and
becomes a no-op on a torch/NumPy that still has the originals (or on a fixed auto-LiRPA).
"""
from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch

__all__ = ["apply_patches", "import_auto_lirpa", "PATCHES_APPLIED"]

PATCHES_APPLIED: list[str] = []     # names of the patches this process needed, in order (for reports)


def _patch_numpy_arraysetops() -> None:
    """Patch 1: ``numpy.lib.arraysetops`` exposing ``isin`` (gone from NumPy 2's public tree)."""
    try:
        import numpy.lib.arraysetops  # noqa: F401
        return
    except ImportError:
        pass
    shim = types.ModuleType("numpy.lib.arraysetops",
                            "deepzero shim: NumPy 2 made numpy.lib.arraysetops private; auto-LiRPA 0.3 "
                            "imports isin from it.")
    shim.isin = np.isin  # type: ignore[attr-defined]
    sys.modules["numpy.lib.arraysetops"] = shim
    np.lib.arraysetops = shim  # type: ignore[attr-defined]
    PATCHES_APPLIED.append("numpy.lib.arraysetops")


def _patch_set_opset_version() -> None:
    """Patch 2: ``torch.onnx.symbolic_helper._set_opset_version`` writing the exporter's opset global."""
    import torch.onnx.symbolic_helper as symbolic_helper
    if hasattr(symbolic_helper, "_set_opset_version"):
        return
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        """What torch < 2.9 did: record the ONNX opset the symbolic functions should target."""
        GLOBALS.export_onnx_opset_version = opset_version

    symbolic_helper._set_opset_version = _set_opset_version  # type: ignore[attr-defined]
    PATCHES_APPLIED.append("torch.onnx.symbolic_helper._set_opset_version")


def _patch_node_getitem() -> None:
    """Patch 3: ``torch._C.Node.__getitem__`` (``node[attr]``) via ``symbolic_helper._node_get``."""
    if hasattr(torch._C.Node, "__getitem__"):
        return
    from torch.onnx.symbolic_helper import _node_get  # type: ignore[attr-defined]
    torch._C.Node.__getitem__ = _node_get  # type: ignore[attr-defined]
    PATCHES_APPLIED.append("torch._C.Node.__getitem__")


def apply_patches() -> None:
    """Apply the three compatibility patches; safe to call any number of times."""
    _patch_numpy_arraysetops()
    _patch_set_opset_version()
    _patch_node_getitem()


def import_auto_lirpa() -> Any:
    """Apply :func:`apply_patches`, import and return the ``auto_LiRPA`` module.

    Use ``lirpa.BoundedModule``, ``lirpa.BoundedTensor`` and ``lirpa.PerturbationLpNorm`` from it.

    Raises:
        ImportError: auto-LiRPA is not installed (``pip install auto-LiRPA==0.3 --no-deps``), or it
            still fails to import after the patches (the message keeps the original error).
    """
    apply_patches()
    try:
        import auto_LiRPA
    except ImportError as err:
        raise ImportError(f"auto-LiRPA could not be imported after the compatibility patches "
                          f"({PATCHES_APPLIED or 'none needed'}): {err}. Install it with "
                          f"`pip install auto-LiRPA==0.3 --no-deps`.") from err
    return auto_LiRPA
