"""The model as a graph of layers, and what the engine decides about each node once, when it plans.

:func:`trace_model` turns a model into a torch.fx graph (an ``nn.Sequential``, any traceable model,
or the stages listed by its ``zo_stages()``). :func:`classify` gives every node an :class:`Op`: how a
perturbation passes through it. :func:`find_blocks` finds the chains the engine evaluates in one
fused pass: ``BatchNorm2d → ReLU → MaxPool2d(2)`` (a :class:`PoolChain`) and a ``Conv2d`` feeding
one (a :class:`ConvBlock`, the unit of DeepZero's CNNs). :class:`Coord` says how one parameter's
coordinates are perturbed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum, auto

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.blackbox import BlackBox
from core.engine import EngineUnsupported
from core.engine import analysis as A

_RELU = {F.relu, torch.relu}
# element-wise ops of two operands (kwargs: constants only); operand order is kept
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, torch.add, torch.sub,
           torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide, torch.pow,
           torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "pow",
                   "maximum", "minimum"}
# element-wise ops of one tensor and constant arguments
_UNARY = {torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg, operator.neg, torch.sqrt,
          torch.square, torch.clamp, torch.clip, torch.sin, torch.cos, torch.erf, F.sigmoid, F.tanh, F.gelu,
          F.silu, F.elu, F.leaky_relu, F.softplus, F.relu6, F.hardtanh, F.hardswish, F.mish, F.selu, F.celu,
          F.logsigmoid}
_UNARY_METHODS = {"sigmoid", "tanh", "exp", "log", "abs", "neg", "sqrt", "square", "clamp", "clip",
                  "clamp_min", "clamp_max", "sin", "cos", "erf"}


class Op(Enum):
    """How a node passes a perturbation on (see :mod:`core.engine.propagate`)."""
    INPUT = auto()      # the model's input: never perturbed
    CONST = auto()      # get_attr: a parameter or buffer read directly
    OUTPUT = auto()     # the losses are computed here
    SHAPE = auto()      # x.size(), x.shape, ...: a perturbation never changes it
    BLACKBOX = auto()   # a query-only stage: called once on all K·B perturbed samples
    MODULE = auto()     # a layer: closed form in core.engine.layers where one exists
    RELU = auto()       # F.relu / torch.relu / x.relu()
    BINARY = auto()     # a ∘ b element-wise (+, −, ·, /, pow, max, min)
    UNARY = auto()      # an element-wise function with constant arguments
    FLATTEN = auto()    # torch.flatten(x, 1) / x.flatten(1)
    GENERIC = auto()    # anything else: evaluated once per perturbation


class Coord(Enum):
    """How the coordinates of one parameter are perturbed (see :mod:`core.engine.sources`)."""
    CONV_WEIGHT = auto()    # W[o, c, i, j] of a Conv2d: channel o += h · shifted input channel c
    LINEAR_WEIGHT = auto()  # W[i, j] of a Linear: unit i += h · x_j
    BN_WEIGHT = auto()      # γ[c] of a BatchNorm: channel c += h · x̂_c
    BIAS = auto()           # a Conv2d/Linear/BatchNorm bias: channel or unit += h
    ABSORBED = auto()       # a conv/linear bias read only by batch-statistics BatchNorm: difference 0
    LAYER = auto()          # no closed form: perturb in place, recompute from the owning layer
    MODEL = auto()          # shared or used functionally: perturb in place, recompute everything


@dataclass(frozen=True)
class PoolChain:
    """``bn → relu → pool`` (BatchNorm2d, ReLU, 2×2/stride-2 MaxPool2d), each the only reader of the last."""
    bn: fx.Node
    relu: fx.Node
    pool: fx.Node


@dataclass(frozen=True)
class ConvBlock:
    """A Conv2d (zero padding, one group) whose only reader starts a :class:`PoolChain`."""
    conv: fx.Node
    chain: PoolChain


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BlackBox) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module) -> tuple[nn.Module, fx.Graph]:
    """(root, graph) of the model's layers; :class:`EngineUnsupported` when torch.fx cannot trace it."""
    root = nn.Sequential(*model.zo_stages()) if hasattr(model, "zo_stages") else model
    try:
        graph = _Tracer().trace(root)
    except Exception as exc:   # tracing runs the user's forward on proxies: any error means "not traceable"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise EngineUnsupported(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                                f"{reason}); give it a zo_stages() method listing its stages") from exc
    return root, graph


def conv2d_supported(m: nn.Module | None) -> bool:
    """A Conv2d whose change is linear in one input channel: zero padding, one group, numeric padding."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _pair(a) -> tuple:
    return tuple(a) if isinstance(a, (tuple, list)) else (a, a)


def is_plain_2x2(m: nn.Module | None) -> bool:
    """MaxPool2d(2): 2×2 windows, stride 2, no padding, dilation or ceil mode."""
    return (isinstance(m, nn.MaxPool2d) and _pair(m.kernel_size) == (2, 2) and _pair(m.stride or 2) == (2, 2)
            and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


def _single_arg(n: fx.Node) -> bool:
    return len(n.args) == 1 and not n.kwargs


def is_relu(n: fx.Node, root: nn.Module) -> bool:
    if n.op == "call_module":
        relu = isinstance(root.get_submodule(n.target), nn.ReLU)
    else:
        relu = (n.op == "call_function" and n.target in _RELU) or (n.op == "call_method" and n.target == "relu")
    return relu and _single_arg(n)


def classify(n: fx.Node, root: nn.Module) -> Op:
    """The node's :class:`Op`, from what it calls (its values are not known yet)."""
    if n.op == "placeholder":
        return Op.INPUT
    if n.op == "get_attr":
        return Op.CONST
    if n.op == "output":
        return Op.OUTPUT
    if A.is_shape_query(n):
        return Op.SHAPE
    if n.op == "call_module":
        return Op.BLACKBOX if isinstance(root.get_submodule(n.target), BlackBox) and _single_arg(n) \
            else Op.MODULE
    if is_relu(n, root):
        return Op.RELU
    fn, method = n.op == "call_function", n.op == "call_method"
    if (fn and n.target in _BINARY) or (method and n.target in _BINARY_METHODS):
        return Op.BINARY
    if (fn and n.target in _UNARY) or (method and n.target in _UNARY_METHODS):
        if not any(isinstance(a, fx.Node) for a in (*n.args[1:], *n.kwargs.values())):
            return Op.UNARY
    if (fn and n.target is torch.flatten) or (method and n.target == "flatten"):
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
        if start == 1 and len(n.args) <= 2 and set(n.kwargs) <= {"start_dim"}:
            return Op.FLATTEN
    return Op.GENERIC


def _module(n: fx.Node, root: nn.Module) -> nn.Module | None:
    return root.get_submodule(n.target) if n.op == "call_module" else None


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def find_blocks(nodes: list[fx.Node], root: nn.Module,
                inplace: dict[fx.Node, fx.Node]) -> tuple[dict[fx.Node, PoolChain], dict[fx.Node, ConvBlock]]:
    """Pool chains by their BatchNorm node and conv blocks by their Conv2d node.

    A chain needs plain single-argument calls and no in-place module inside it (an in-place one
    would need the copy rules of :mod:`core.engine.analysis`).
    """
    chains: dict[fx.Node, PoolChain] = {}
    for n in nodes:
        relu = _only_user(n)
        pool = _only_user(relu) if relu is not None else None
        if not isinstance(_module(n, root), nn.BatchNorm2d) or pool is None or not _single_arg(n):
            continue
        if is_relu(relu, root) and is_plain_2x2(_module(pool, root)) and _single_arg(pool) \
                and not {n, relu, pool} & set(inplace):
            chains[n] = PoolChain(n, relu, pool)
    blocks = {}
    for n in nodes:
        bn = _only_user(n)
        if conv2d_supported(_module(n, root)) and _single_arg(n) and bn in chains and n not in inplace:
            blocks[n] = ConvBlock(n, chains[bn])
    return chains, blocks


def averaged_pools(chains: dict[fx.Node, PoolChain], root: nn.Module,
                   inplace: dict[fx.Node, fx.Node]) -> dict[fx.Node, fx.Node]:
    """Pool node of a chain -> the global average pool (``AdaptiveAvgPool2d(1)``) that alone reads it."""
    out = {}
    for c in chains.values():
        gap = _only_user(c.pool)
        m = _module(gap, root) if gap is not None else None
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1) and _single_arg(gap) \
                and gap not in inplace:
            out[c.pool] = gap
    return out


def coord_kind(m: nn.Module, p: nn.Parameter) -> Coord:
    """The closed form for a parameter of module ``m`` (:attr:`Coord.LAYER` when there is none)."""
    if conv2d_supported(m) or isinstance(m, nn.Linear) or \
            (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine):
        if p is getattr(m, "bias", None):
            return Coord.BIAS
        if p is m.weight:
            return Coord.CONV_WEIGHT if isinstance(m, nn.Conv2d) else \
                Coord.LINEAR_WEIGHT if isinstance(m, nn.Linear) else Coord.BN_WEIGHT
    return Coord.LAYER


def descendants(nodes: list[fx.Node], start: fx.Node) -> list[fx.Node]:
    """Nodes after ``start`` (graph order) whose value a change of ``start`` can reach, and the output."""
    reached = {start}
    out = []
    for n in nodes:
        if A.is_shape_query(n):
            continue
        if n.op == "output" or (n not in reached and any(a in reached for a in n.all_input_nodes)):
            reached.add(n)
            out.append(n)
    return out
