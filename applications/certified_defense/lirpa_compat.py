"""Import auto-LiRPA (PyPI 0.3) on today's NumPy 2 and torch 2.14, through compatibility patches.

auto-LiRPA 0.3 (Xu et al. 2020, "Automatic Perturbation Analysis for Scalable Certified Robustness
and Beyond", NeurIPS, arXiv:2002.12920) was written against NumPy 1 and the TorchScript-based ONNX
exporter of torch 1.x/2.0. It traces a model with ``torch.jit._get_trace_graph``, lowers the trace to
ONNX ops with ``torch.onnx.utils._optimize_graph`` and reads each node's attributes. Three things it
needs at import and trace time have since moved or gone away (patches 1–3), and two more broke
bound computation (patches 4–5). Each was found by importing auto-LiRPA and bounding models here, with
the import failing (or the bound going wrong) without it; the tests in
``tests/applications/certified_defense/test_verify.py`` exercise all five:

1. ``numpy.lib.arraysetops`` — ``auto_LiRPA/operators/base.py`` does ``from numpy.lib.arraysetops
   import isin``. NumPy 2 made that module private (``numpy.lib._arraysetops_impl``), so the import
   fails with ``ModuleNotFoundError`` and nothing of auto-LiRPA loads. Patch: register a small module
   ``numpy.lib.arraysetops`` in ``sys.modules`` that exposes ``numpy.isin`` (the same function).
2. ``torch.onnx.symbolic_helper._set_opset_version`` — ``auto_LiRPA/parse_graph.py`` imports it at
   module level and calls ``_set_opset_version(12)`` before ``_optimize_graph``. Current torch moved the
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

Patches 4–5 need auto-LiRPA loaded, so :func:`import_auto_lirpa` applies them right after the import:

4. ``BoundedModule._named_members`` — auto-LiRPA overrides this ``nn.Module`` helper with the
   torch-1.x signature ``(get_members_fn, prefix, recurse)``. torch ≥ 2.0 calls it with
   ``remove_duplicate=...`` from ``named_parameters``/``named_buffers``, so ``bm.parameters()`` raises
   ``TypeError: ... unexpected keyword argument 'remove_duplicate'`` (hit by CROWN in ``conv_mode=
   'matrix'`` through ``get_sparse_C``). Patch: wrap it with a signature that accepts and ignores
   ``remove_duplicate`` (auto-LiRPA's version always removes duplicates, the torch default).
5. ``torch.clamp``'s gradient at the bounds — alpha-CROWN (Xu et al. 2021, "Fast and Complete",
   ICLR) optimises the lower ReLU slopes α ∈ [0, 1] by gradient ascent, and auto-LiRPA starts them
   at CROWN's adaptive choice, which is exactly 0 or 1. ``BoundRelu._relu_mask_alpha`` passes α
   through ``torch.clamp(α, 0, 1)``. torch used to give clamp the subgradient 1 at min and max
   (pytorch/pytorch#7049, 2018); current torch uses the minimum-norm subgradient 0 there
   (pytorch/pytorch#184574, #191142), so every α has zero gradient and alpha-CROWN silently returns
   the CROWN bound (measured: loss constant over all iterations, ``alpha.grad == 0``). Patch: the same
   function with a clamp whose value is ``clamp(α, 0, 1)`` and whose gradient is 1 (α is clipped back
   into [0, 1] after every step by ``clip_alpha_``, so the value never leaves the box). Applied only
   if ``torch.clamp`` has zero gradient at its bounds.

Nothing else was needed for Linear, Conv2d, BatchNorm2d (eval), ReLU, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d(1), Flatten and the residual subtraction of DnCNN with IBP, CROWN and alpha-CROWN
on CPU (NumPy 2 has ``np.bool`` again, which ``perturbations.py`` uses; ``appdirs``/``packaging``/
``tqdm`` are in the environment even though 0.3 was installed ``--no-deps``). Limitations of
auto-LiRPA 0.3 itself (not version drift) are worked around in :mod:`.verify` and listed there.

Every patch is applied only if the thing it replaces is missing or broken, so the module is
idempotent and becomes a no-op on a torch/NumPy that still has the originals (or a fixed auto-LiRPA).
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Optional

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
    """Apply the pre-import compatibility patches (1–3); safe to call any number of times."""
    _patch_numpy_arraysetops()
    _patch_set_opset_version()
    _patch_node_getitem()


def import_auto_lirpa() -> Any:
    """Apply :func:`apply_patches`, import and return the ``auto_LiRPA`` module.

    Also applies patches 4–5, which need auto-LiRPA loaded. Use ``lirpa.BoundedModule``,
    ``lirpa.BoundedTensor`` and ``lirpa.PerturbationLpNorm`` from it.

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
    _patch_named_members(auto_LiRPA.BoundedModule)
    _patch_relu_alpha_clamp()
    return auto_LiRPA


def _patch_named_members(bounded_module: type) -> None:
    """Patch 4: ``BoundedModule._named_members`` accepting torch ≥ 2.0's ``remove_duplicate``."""
    original = bounded_module._named_members
    if "remove_duplicate" in inspect.signature(original).parameters:
        return

    def _named_members(self: Any, get_members_fn: Any, prefix: str = "", recurse: bool = True,
                       remove_duplicate: bool = True) -> Any:
        del remove_duplicate                       # auto-LiRPA always removes duplicates (torch's default)
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    bounded_module._named_members = _named_members
    PATCHES_APPLIED.append("auto_LiRPA.BoundedModule._named_members")


def _clamp_kills_boundary_gradient() -> bool:
    a = torch.tensor([0.0, 1.0], requires_grad=True)
    (grad,) = torch.autograd.grad(torch.clamp(a, min=0.0, max=1.0).sum(), a)
    return bool((grad == 0).any())


def _clamp01_keep_gradient(a: torch.Tensor) -> torch.Tensor:
    """Value ``clamp(a, 0, 1)``, gradient 1 everywhere (clamp's old subgradient at the bounds)."""
    return a + (a.clamp(0.0, 1.0) - a).detach()


def _relu_mask_alpha(lower: torch.Tensor, upper: torch.Tensor, lb_lower_d: Optional[torch.Tensor],
                     ub_lower_d: Optional[torch.Tensor]
                     ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """auto-LiRPA 0.3's ``BoundRelu._relu_mask_alpha`` with :func:`_clamp01_keep_gradient` for clamp.

    Slopes of stable neurons are fixed (1 if lower ≥ 0, 0 if upper ≤ 0); unstable ones take α.
    """
    lower_mask = (lower >= 0).requires_grad_(False).to(lower.dtype)
    upper_mask = (upper <= 0).requires_grad_(False)
    zero_coeffs = upper_mask.all()
    no_mask = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
    if lb_lower_d is not None:
        lb_lower_d = _clamp01_keep_gradient(lb_lower_d) * no_mask + lower_mask
    if ub_lower_d is not None:
        ub_lower_d = _clamp01_keep_gradient(ub_lower_d) * no_mask + lower_mask
    return lb_lower_d, ub_lower_d, zero_coeffs


def _patch_relu_alpha_clamp() -> None:
    """Patch 5: alpha-CROWN's ReLU slopes get a gradient at 0 and 1 again."""
    from auto_LiRPA.operators.activation import BoundRelu
    if BoundRelu._relu_mask_alpha is _relu_mask_alpha or not _clamp_kills_boundary_gradient():
        return
    BoundRelu._relu_mask_alpha = staticmethod(_relu_mask_alpha)
    PATCHES_APPLIED.append("auto_LiRPA BoundRelu._relu_mask_alpha (clamp boundary gradient)")
