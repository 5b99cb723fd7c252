"""What the fast CGE engine can compute exactly, decided before it perturbs anything.

The engine runs a torch.fx graph of the model, not the model itself, and propagates perturbations
through that graph as single tensors. Three things can make the graph differ from eager PyTorch,
or break that assumption; each is either made exact here or refused with
:class:`core.engine.EngineUnsupported` naming the node and why:

- **in-place operations** (:func:`functionalize`): ``h.add_(y)``, ``torch.relu_(h)``,
  ``F.relu(h, inplace=True)`` become their out-of-place forms and every later reader of ``h``
  reads the result instead (what eager computes, since ``h`` then holds the result); in-place
  modules (``nn.ReLU(inplace=True)``) keep their call but get a copy of their input. This is exact
  only when no *other* tensor sharing ``h``'s storage (a view) is read afterwards:
  :func:`check_aliasing` verifies that on the values of the caching forward. In-place operations
  without an out-of-place form (``fill_``, ``copy_``, ``out=``) are refused.
- **hidden mutation** (:class:`VersionGuard`): a cached tensor changed in place where the graph
  cannot see it (inside a leaf module or a wrapped function) — its ``_version`` moves.
- **non-tensor values** (:func:`check_values`): a node downstream of a perturbed layer producing a
  tuple, list or dict (``nn.GRU``/``nn.LSTM``, ``torch.split``, a dict-returning model).

torch.fx traces ``h += y`` as ``h = h + y`` (no in-place node at all); an alias of ``h`` read later
then sees other values than in eager. :func:`outputs_match` (the graph's output against the
model's own, once per train/eval configuration) is the safety net for that and any other
tracing mismatch.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.engine import EngineUnsupported

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                      operator.imod: operator.mod, operator.ipow: operator.pow,
                      operator.imatmul: operator.matmul,
                      operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
                      operator.ilshift: operator.lshift, operator.irshift: operator.rshift}
# in-place methods whose name minus "_" is not the same computation (random draws, storage tricks)
_NO_OUT_OF_PLACE = {"bernoulli_", "resize_", "set_", "as_strided_", "detach_"}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}


def describe(node: fx.Node, root: nn.Module) -> str:
    """``node 'name' (what it calls)`` for messages: the module path and type, function or method."""
    if "zo_inplace" in node.meta:                        # as the user wrote it, before functionalize
        return node.meta["zo_inplace"]
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"node '{node.name}' ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method":
        return f"node '{node.name}' (Tensor.{node.target})"
    return f"node '{node.name}' ({node.op})"


def is_shape_query(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape``...: values a perturbation never changes."""
    return (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
        node.op == "call_function" and node.target is getattr and len(node.args) == 2
        and node.args[1] in _SHAPE_ATTRS)


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins (torch.relu, operator.add) have none
        return None


def _drop_inplace_argument(node: fx.Node) -> bool:
    """Remove an ``inplace`` argument (F.relu(x, inplace=True), F.leaky_relu(x, 0.1, True)).

    Returns whether it was True. Arguments after it move to keywords, so the call is unchanged.
    """
    sig = _signature(node.target)
    if sig is None or "inplace" not in sig.parameters:
        return False
    names = list(sig.parameters)
    pos = names.index("inplace")
    kwargs = dict(node.kwargs)
    flag = kwargs.pop("inplace", False)
    if len(node.args) > pos:
        flag = node.args[pos]
        kwargs.update(zip(names[pos + 1:], node.args[pos + 1:]))
    if isinstance(flag, fx.Node):
        raise EngineUnsupported(f"{node.name}: its inplace= flag is computed, not a constant")
    node.args, node.kwargs = tuple(node.args[:pos]), kwargs
    return bool(flag)


def _rewrite_inplace(node: fx.Node, root: nn.Module) -> bool:
    """Turn an in-place call into its out-of-place form (modules: left as they are).

    Returns whether ``node`` overwrites its first argument in eager PyTorch.
    """
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "inplace", False) is True
    if node.op not in ("call_function", "call_method"):
        return False
    if "out" in node.kwargs:
        raise EngineUnsupported(f"{describe(node, root)} writes into an existing tensor (out=)")
    if node.op == "call_method":
        name = node.target
        if not name.endswith("_") or name.startswith("_"):
            return False
        if name in _NO_OUT_OF_PLACE or not callable(getattr(torch.Tensor, name[:-1], None)):
            raise EngineUnsupported(f"{describe(node, root)} changes a tensor in place and has no "
                                    "out-of-place form the engine can substitute")
        node.target = name[:-1]
        return True
    target = node.target
    if target in _INPLACE_OPERATORS:
        node.target = _INPLACE_OPERATORS[target]
        return True
    if target is operator.setitem:
        raise EngineUnsupported(f"{describe(node, root)} assigns into a tensor in place")
    if _drop_inplace_argument(node):
        return True
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and target in (getattr(torch, name, None),
                                                                     getattr(F, name, None)):
        base = getattr(torch, name[:-1], None) or getattr(F, name[:-1], None)
        if base is None or name in _NO_OUT_OF_PLACE:
            raise EngineUnsupported(f"{describe(node, root)} changes a tensor in place and has no "
                                    "out-of-place form the engine can substitute")
        node.target = base
        return True
    return False


def functionalize(graph: fx.Graph, root: nn.Module) -> dict[fx.Node, fx.Node]:
    """Make in-place nodes out-of-place (see the module docstring); edits ``graph``.

    Returns ``{in-place node: the node whose value it overwrites}``.
    """
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    inplace: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        written = describe(n, root)
        if not _rewrite_inplace(n, root):
            continue
        n.meta["zo_inplace"] = written
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node):
            raise EngineUnsupported(f"{describe(n, root)} works in place on something that is not a "
                                    "traced value")
        if src.op == "placeholder":
            raise EngineUnsupported(f"{describe(n, root)} overwrites the model's input '{src.name}' in place")
        if src.op == "get_attr":
            raise EngineUnsupported(f"{describe(n, root)} overwrites the parameter or buffer "
                                    f"'{src.target}' in place")
        for user in list(src.users):
            if user is not n and order[user] > order[n]:
                user.replace_input_with(src, n)   # eager: they read the overwritten tensor
        inplace[n] = src
    return inplace


def affected_nodes(nodes: list[fx.Node], sources: set[fx.Node]) -> set[fx.Node]:
    """Every node whose value a perturbation of a ``sources`` node can change (shape queries excepted)."""
    out = set(sources)
    for n in nodes:
        if n not in out and not is_shape_query(n) and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def type_name(v: Any) -> str:
    """A value's type for messages (torch.fx's immutable_dict reads as dict)."""
    name = type(v).__name__
    return name.removeprefix("immutable_")              # torch.fx's immutable_dict / immutable_list


def check_values(env: dict[fx.Node, Any], affected: list[fx.Node], root: nn.Module) -> None:
    """The engine propagates single tensors: refuse a tuple/list/dict anywhere a perturbation reaches.

    ``affected`` in graph order, so the message names the first such node (the layer itself).
    """
    for n in affected:
        v = env[n]
        if isinstance(v, torch.Tensor):
            continue
        what = type_name(v)
        if n.op == "output":
            raise EngineUnsupported(f"the model returns a {what}, not one tensor")
        raise EngineUnsupported(f"{describe(n, root)} returns a {what}, not one tensor, downstream of a "
                                "perturbed layer (the engine propagates single tensors only)")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def check_aliasing(node: fx.Node, src: fx.Node, env: dict[fx.Node, Any], order: dict[fx.Node, int],
                   root: nn.Module) -> None:
    """Before in-place ``node`` runs: no other value sharing ``src``'s storage may be read after it.

    Such a view would see the overwritten values in eager PyTorch, but not in the functionalised
    graph (where ``node`` writes a new tensor).
    """
    s = env[src]
    if not isinstance(s, torch.Tensor):
        return
    ptr = _storage(s)
    for other, v in env.items():
        if other is src or not isinstance(v, torch.Tensor) or _storage(v) != ptr:
            continue
        if other.op in ("placeholder", "get_attr"):
            raise EngineUnsupported(f"{describe(node, root)} overwrites '{src.name}', a view of the model's "
                                    f"{'input' if other.op == 'placeholder' else 'parameter'} '{other.name}'")
        for user in other.users:
            if user is not node and order[user] > order[node]:
                raise EngineUnsupported(f"{describe(node, root)} overwrites '{src.name}' in place while "
                                        f"'{other.name}', which shares its memory, is read later by "
                                        f"'{user.name}'")


class VersionGuard:
    """Detect a cached tensor changed in place during the caching forward (its ``_version`` moves).

    ``after(node, env)`` checks the inputs of the node that just ran (naming it as the culprit);
    ``final(env)`` sweeps every cached value (a change from outside any node's inputs).
    Inference-mode tensors have no version counter and are skipped.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.versions: dict[fx.Node, int] = {}

    def record(self, node: fx.Node, value: Any) -> None:
        if isinstance(value, torch.Tensor) and not value.is_inference():
            self.versions[node] = value._version

    def after(self, node: fx.Node, env: dict[fx.Node, Any]) -> None:
        for a in node.all_input_nodes:
            if a in self.versions and env[a]._version != self.versions[a]:
                raise EngineUnsupported(f"{describe(node, self.root)} changes its input (the value of "
                                        f"{describe(a, self.root)}) in place where the traced graph "
                                        "cannot see it")

    def final(self, env: dict[fx.Node, Any]) -> None:
        for n, ver in self.versions.items():
            if env[n]._version != ver:
                raise EngineUnsupported(f"the cached value of {describe(n, self.root)} was changed in place "
                                        "later in the forward, where the traced graph cannot see it")


def outputs_match(graph_out: torch.Tensor, model_out: Any) -> bool:
    """The graph reproduces the model's output (up to a few ulps: GPU kernels may differ in order)."""
    if not isinstance(model_out, torch.Tensor) or model_out.shape != graph_out.shape \
            or model_out.dtype != graph_out.dtype:
        return False
    if not graph_out.is_floating_point():
        return torch.equal(graph_out, model_out)
    tol = torch.finfo(graph_out.dtype).eps ** 0.5
    finite = model_out[model_out.isfinite()]          # a NaN or inf output must not set the tolerance
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.allclose(graph_out, model_out, rtol=tol, atol=tol * scale, equal_nan=True))
