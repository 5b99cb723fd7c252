"""Exact coordinate-wise gradient estimation, fast.

Produces the same numbers as the naive CGE loop (one perturbed forward per coordinate) by

1. **layer-level feature reuse**: the model is traced to a graph of layers (torch.fx; an
   ``nn.Sequential``, any traceable model, or a model listing its stages in ``zo_stages()``); one
   unperturbed forward caches every node's value, and a perturbation only recomputes the nodes
   that depend on its layer (DeepZero, Chen et al. 2024, reuses features per block; here per layer);
2. **delta forward** (:mod:`core.engine.delta`): a Conv2d/Linear/BN coordinate changes a single
   output channel or unit by a closed form of the cached input, the channel-wise layers after it
   (and element-wise sums, differences and products with an unchanged branch) process that
   channel only, and the next Conv/Linear adds a one-channel convolution of the change;
3. **batched perturbations**: K coordinates travel together through the downstream layers as one
   batch of K·B samples (with per-perturbation BatchNorm statistics in train mode).

Layers without a closed form (custom modules, shared weights, parameters used functionally) fall
back to perturbing the parameter in place and recomputing from its layer (or the whole model).
What the engine cannot reproduce exactly — more than one input, a non-tensor value downstream of a
perturbed layer (``nn.GRU``, a dict output), an in-place update it cannot make out-of-place, a
graph that computes another output than the model — raises :class:`core.engine.EngineUnsupported`
before any perturbation, with buffers restored (see :mod:`core.engine.analysis`).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.blackbox import BlackBox
from core.engine import EngineUnsupported
from core.engine import analysis as A
from core.engine import delta as D
from core.engine.losses import BatchedLoss
from core.estimators.base import frozen_buffers

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


def _map(a, fn):
    return fx.node.map_aggregate(a, lambda x: fn(x) if isinstance(x, fx.Node) else x)


def _tensor_of(rep: D.Rep) -> torch.Tensor:
    return rep.t if isinstance(rep, D.Full) else rep.v


class FastCGE:
    """The engine behind :class:`core.CGE` for supervised losses ``loss_fn(model(x), y)``.

    Args:
        model: the model; its parameters are read live (no copies).
        named_params: the owned parameters ``[(name, p)]``.
        max_elems: bound on the elements of one batched downstream activation; sets K.

    Raises:
        EngineUnsupported: the graph has more than one input, returns a literal tuple/dict, or
            changes a value in place in a way the engine cannot make out-of-place.
    """

    def __init__(self, model: nn.Module, named_params: list[tuple[str, nn.Parameter]], *,
                 max_elems: int = 1 << 20) -> None:
        self.model, self.named_params = model, named_params
        self.max_elems = max_elems
        self.losses = BatchedLoss()
        self.has_blackbox = any(isinstance(m, BlackBox) for m in model.modules())
        self._build()

    def _build(self) -> None:
        """Trace, functionalise in-place updates, and plan how each owned parameter is perturbed.

        torch.fx freezes Python control flow (``if self.training:``) into the graph, so
        :meth:`estimate` rebuilds when a module's train/eval flag changed since.
        """
        model, named_params = self.model, self.named_params
        self._traced_modes = self._modes()
        self._verified_modes: tuple[bool, ...] | None = None
        self.root, self.graph = trace_model(model)
        self.nodes: list[fx.Node] = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        inputs = [n.name for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise EngineUnsupported(f"its forward takes {len(inputs)} inputs ({', '.join(inputs)}); "
                                    "the engine feeds exactly one")
        (self.output,) = [n for n in self.nodes if n.op == "output"]
        if not isinstance(self.output.args[0], fx.Node):
            raise EngineUnsupported(f"the model returns a {A.type_name(self.output.args[0])}, not one tensor")
        self.inplace = A.functionalize(self.graph, self.root)        # {in-place node: value it overwrites}
        self.inplace_modules = {n for n in self.inplace if n.op == "call_module"}
        # which node owns each parameter, and how it is perturbed
        users: dict[int, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                for p in self.root.get_submodule(n.target).parameters(recurse=True):
                    users.setdefault(id(p), []).append(n)
            elif n.op == "get_attr":
                users.setdefault(id(self._attr(n.target)), []).append(n)
        self.fused = self._bn_relu_pool_chains()
        self.plan: list[tuple[str, nn.Parameter, fx.Node | None, str]] = []
        for name, p in named_params:
            owners = users.get(id(p), [])
            if len(owners) != 1 or owners[0].op != "call_module":
                self.plan.append((name, p, None, "model"))         # shared/functional: full forward
                continue
            node = owners[0]
            m = self.root.get_submodule(node.target)
            self.plan.append((name, p, node, self._kind(m, p)))
        fused_relus = {relu for relu, _ in self.fused.values()}
        # storage sharing between perturbed tensors only matters where a ReLU may overwrite its input
        self._track_sharing = any(
            n not in fused_relus and (self._is_relu(n) or n in self.inplace_modules) for n in self.nodes)
        self._shape_queries = {n for n in self.nodes if A.is_shape_query(n)}
        affected = A.affected_nodes(self.nodes, {node for _, _, node, _ in self.plan if node is not None})
        self.affected = [n for n in self.nodes if n in affected]     # graph order

    def _bn_relu_pool_chains(self) -> dict[fx.Node, tuple[fx.Node, fx.Node]]:
        """BatchNorm2d nodes whose only user is a ReLU whose only user is a plain 2×2 max-pool."""
        def module(n):
            return self.root.get_submodule(n.target) if n.op == "call_module" else None

        chains = {}
        for n in self.nodes:
            if not isinstance(module(n), nn.BatchNorm2d) or len(n.users) != 1:
                continue
            (relu,) = n.users
            if not self._is_relu(relu) or len(relu.users) != 1:
                continue
            (pool,) = relu.users
            if D._is_plain_2x2(module(pool)) and len(pool.args) == 1 and not pool.kwargs:
                chains[n] = (relu, pool)
        return chains

    def _is_relu(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            relu = isinstance(self.root.get_submodule(n.target), nn.ReLU)
        else:
            relu = (n.op == "call_function" and n.target in _RELU) or (
                n.op == "call_method" and n.target == "relu")
        return relu and len(n.args) == 1 and not n.kwargs

    def _attr(self, target: str):
        obj = self.root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    @staticmethod
    def _kind(m: nn.Module, p: nn.Parameter) -> str:
        if D.conv2d_supported(m):
            return "conv_w" if p is m.weight else "bias" if p is m.bias else "layer"
        if isinstance(m, nn.Linear):
            return "lin_w" if p is m.weight else "bias" if p is m.bias else "layer"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            return "bn_w" if p is m.weight else "bias" if p is m.bias else "layer"
        return "layer"

    # -- unperturbed forward with caching -------------------------------------------------------
    def _run(self, node: fx.Node, env: dict[fx.Node, Any], x: torch.Tensor):
        args = _map(node.args, lambda n: env[n])
        kwargs = _map(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            return x
        if node.op == "get_attr":
            return self._attr(node.target)
        if node.op == "call_module":
            if node in self.inplace_modules:            # it overwrites its input: keep the cached one
                args = (args[0].clone(), *args[1:])
            return self.root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return args[0]  # output

    def forward_cached(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        """Every node's value; refuses in-place updates that would make the cache stale."""
        env: dict[fx.Node, Any] = {}
        guard = A.VersionGuard(self.root)
        for n in self.nodes:
            if n in self.inplace:
                A.check_aliasing(n, self.inplace[n], env, self.order, self.root)
            env[n] = self._run(n, env, x)
            guard.after(n, env)
            guard.record(n, env[n])
        guard.final(env)
        return env

    def _save_state(self) -> tuple[list, list]:
        """Buffers and BlackBox query counters, to undo a forward whose estimate is refused."""
        bufs = {id(b): b for m in (self.model, self.root) for b in m.buffers()}
        boxes = [m for m in self.model.modules() if isinstance(m, BlackBox)]
        return [(b, b.detach().clone()) for b in bufs.values()], [(m, m.queries) for m in boxes]

    @staticmethod
    def _restore_state(state: tuple[list, list]) -> None:
        bufs, boxes = state
        with torch.no_grad():
            for b, v in bufs:
                b.copy_(v)
        for m, q in boxes:
            m.queries = q

    def _model_output(self, x: torch.Tensor, state) -> tuple[torch.Tensor, dict] | None:
        """The model's own output and each layer's inputs (same RNG draws), once per train/eval setting.

        None when already verified, or for models with a BlackBox stage (its queries are counted
        and budgeted, so the engine spends none on a check).
        """
        if self.has_blackbox or self._verified_modes == self._modes():
            return None
        seen: dict[nn.Module, list[torch.Tensor | None]] = {}

        def record_input(module, args):
            first = args[0] if args else None
            seen.setdefault(module, []).append(first.clone() if isinstance(first, torch.Tensor) else None)

        layers = {self.root.get_submodule(n.target) for n in self.nodes if n.op == "call_module"}
        hooks = [m.register_forward_pre_hook(record_input) for m in layers]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                out = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        self._restore_state(state)
        return out, seen

    def _first_divergence(self, env, seen: dict[nn.Module, list]) -> fx.Node | None:
        """The first layer (graph order) whose input in the graph differs from the model's own."""
        calls: dict[nn.Module, int] = {}
        for n in self.nodes:
            if n.op != "call_module":
                continue
            m = self.root.get_submodule(n.target)
            i = calls[m] = calls.get(m, -1) + 1
            ref = seen.get(m, [])
            if i >= len(ref):
                return n
            got = env[n.args[0]] if n.args and isinstance(n.args[0], fx.Node) else None
            if isinstance(ref[i], torch.Tensor) and isinstance(got, torch.Tensor) and \
                    not A.outputs_match(got, ref[i]):
                return n
        return None

    def _modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self.model.modules())

    # -- perturbed propagation -------------------------------------------------------------------
    def _generic(self, node: fx.Node, env, envc, changed: dict[fx.Node, D.Rep], K: int) -> D.Full:
        """Any node: run it once per perturbation on materialised inputs (always exact)."""
        full = {n: D.materialize(r, envc.get(n)) for n, r in changed.items() if n in node.all_input_nodes}
        outs = []
        for k in range(K):
            def val(n):
                if n not in full:
                    return env[n]
                t = full[n][k]
                return t.transpose(0, 1) if t.dim() >= 2 else t
            args, kwargs = _map(node.args, val), _map(node.kwargs, val)
            if node.op == "call_module":
                if node in self.inplace_modules:      # it overwrites its input: not the cached one
                    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                out = self.root.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                out = node.target(*args, **kwargs)
            else:
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            outs.append(D.channel_major(out))
        return D.Full(torch.stack(outs))

    def _exclusive(self, src: fx.Node, node: fx.Node, share: dict[fx.Node, list[fx.Node]]) -> bool:
        """No node after ``node`` reads ``src``'s perturbed tensor (or a view of it): overwriting is safe."""
        if src not in share:
            return False
        return all(u is node or self.order[u] < self.order[node] for a in share[src] for u in a.users)

    @staticmethod
    def _note_sharing(n: fx.Node, r: D.Rep, changed: dict[fx.Node, D.Rep],
                      share: dict[fx.Node, list[fx.Node]]) -> None:
        """Group ``n`` with its input when its perturbed tensor is a view or pass-through of it."""
        ins = [a for a in n.all_input_nodes if a in changed]
        if len(ins) == 1 and ins[0] in share and _tensor_of(r).untyped_storage().data_ptr() == \
                _tensor_of(changed[ins[0]]).untyped_storage().data_ptr():
            share[n] = share[ins[0]]
            share[n].append(n)
        else:
            share[n] = [n]

    def _binary(self, node: fx.Node, env, envc, changed: dict[fx.Node, D.Rep]) -> D.Rep | None:
        """``a ∘ b`` element-wise (+, −, ·, /, pow, max, min): compact when one side is unchanged."""
        if len(node.args) != 2 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        a, b = node.args
        if node.op == "call_method":
            def fn(p, q):
                return getattr(p, node.target)(q, **node.kwargs)
        else:
            def fn(p, q):
                return node.target(p, q, **node.kwargs)
        ca, cb = isinstance(a, fx.Node) and a in changed, isinstance(b, fx.Node) and b in changed
        if ca and cb:
            if env[a].shape != env[b].shape:
                return None
            return D.Full(fn(D.materialize(changed[a], envc.get(a)), D.materialize(changed[b], envc.get(b))))
        src, other = (a, b) if ca else (b, a)
        o = env[other] if isinstance(other, fx.Node) else other
        rep = changed[src]
        if isinstance(o, (int, float, bool)) or (isinstance(o, torch.Tensor) and o.dim() == 0):
            return D.apply(rep, (lambda v: fn(v, o)) if ca else (lambda v: fn(o, v)))
        if isinstance(o, torch.Tensor) and o.shape == env[src].shape and o.dim() >= 1:
            return D.combine(rep, envc[other], fn, rep_first=ca)
        return None

    def _propagate_node(self, node: fx.Node, env, envc, changed: dict[fx.Node, D.Rep], K: int,
                        share: dict[fx.Node, list[fx.Node]]) -> D.Rep | None:
        if not any(n in changed for n in node.all_input_nodes):
            return None
        if node in self._shape_queries:
            return None  # shapes do not change
        single = len(node.args) == 1 and not node.kwargs
        src = node.args[0] if node.args else None
        if node.op == "call_module":
            m = self.root.get_submodule(node.target)
            if isinstance(m, BlackBox) and single:
                t = D.batch_major(D.materialize(changed[src], envc.get(src)))    # [K, B, ...]
                out = m(t.reshape(-1, *t.shape[2:]))                                # one call, K·B queries
                return D.Full(D.from_batch_major(out.reshape(K, -1, *out.shape[1:])))
            if single and src in changed and isinstance(env[src], torch.Tensor) and env[src].dim() >= 1:
                overwrite = (isinstance(m, nn.ReLU) or getattr(m, "inplace", False)) and \
                    self._exclusive(src, node, share)
                rep = D.propagate_module(m, changed[src], envc[src], envc.get(node), env[src].dim() - 1,
                                         inplace=overwrite)
                if rep is not None:
                    return rep
        elif self._is_relu(node):
            overwrite = self._exclusive(src, node, share)
            return D.apply(changed[src], lambda a: F.relu(a, inplace=overwrite))
        elif (node.op == "call_function" and node.target in _BINARY) or (
                node.op == "call_method" and node.target in _BINARY_METHODS):
            rep = self._binary(node, env, envc, changed)
            if rep is not None:
                return rep
        elif ((node.op == "call_function" and node.target in _UNARY) or (
                node.op == "call_method" and node.target in _UNARY_METHODS)) and src in changed and \
                not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            rest, kw = node.args[1:], node.kwargs
            if node.op == "call_method":
                return D.apply(changed[src], lambda v: getattr(v, node.target)(*rest, **kw))
            return D.apply(changed[src], lambda v: node.target(v, *rest, **kw))
        elif (node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start == 1 and len(node.args) <= 2 and set(node.kwargs) <= {"start_dim"} and src in changed:
                rep = D.propagate_module(nn.Flatten(), changed[src], envc[src], envc[node], env[src].dim() - 1)
                if rep is not None:
                    return rep
        return self._generic(node, env, envc, changed, K)

    def _downstream_width(self, node: fx.Node, env) -> int:
        """Per-sample elements of the widest *fully perturbed* activation after ``node``.

        Until the first channel-mixing layer a coordinate's change stays in one channel, so those
        nodes count one channel only. Bounds the chunk size K (keeps batches cache-sized).
        """
        channel_local = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                         nn.Identity, nn.Flatten, *D.ELEMENTWISE)
        mixed, widest = False, 1
        for n in self.nodes[self.order[node]:]:
            v = env.get(n)
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            size = v[0].numel()
            widest = max(widest, size if mixed else size // max(1, v.shape[1] if v.dim() > 1 else 1))
            local = n is node or (n.op == "call_module" and isinstance(self.root.get_submodule(n.target),
                                                                         channel_local))
            mixed = mixed or not local
        return widest

    def evaluate(self, node: fx.Node, rep: D.Rep, env, envc, y) -> torch.Tensor:
        """Losses [K] of K perturbations whose effect at ``node`` is ``rep``."""
        K = rep.K
        changed: dict[fx.Node, D.Rep] = {node: rep}
        share: dict[fx.Node, list[fx.Node]] = {node: [node]}     # nodes whose perturbed tensors share storage
        done: set[fx.Node] = set()
        for n in self.nodes[self.order[node] + 1:]:
            if n in done:
                continue
            if n in self.fused and n.args[0] in changed:
                r = D.bn_relu_maxpool2x2(self.root.get_submodule(n.target), changed[n.args[0]])
                if r is not None:
                    relu, pool = self.fused[n]
                    changed[pool], share[pool] = r, [pool]
                    done.update((relu, pool))
                    continue
            if n.op == "output":
                src = n.args[0]
                if src not in changed:
                    return self.losses(env[src].unsqueeze(0).expand(K, *env[src].shape), y)
                return self.losses(D.batch_major(D.materialize(changed[src], envc.get(src))), y)
            r = self._propagate_node(n, env, envc, changed, K, share)
            if r is not None:
                changed[n] = r
                if self._track_sharing:
                    self._note_sharing(n, r, changed, share)
        raise AssertionError(f"graph has no output after {node}")

    # -- the estimate ------------------------------------------------------------------------------
    def estimate(self, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, mu: float, central: bool,
                 active: list[torch.Tensor], full_forward: Callable[[], torch.Tensor],
                 chunk: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """Returns (unperturbed loss, gradient per owned parameter (flat), perturbed evaluations).

        Raises:
            EngineUnsupported: decided before any perturbation, with buffers (BN running stats)
                and BlackBox counters restored to their values before the call.
        """
        if self._modes() != self._traced_modes:
            self._build()                               # train/eval switched: trace again
        state = self._save_state()
        reference = self._model_output(x, state)
        try:
            env = self.forward_cached(x)
            A.check_values(env, self.affected, self.root)
            out = env[self.output]
            if not isinstance(out, torch.Tensor):
                raise EngineUnsupported(f"the model returns a {A.type_name(out)}, not one tensor")
            if reference is not None and not A.outputs_match(out, reference[0]):
                at = self._first_divergence(env, reference[1])
                where = f"; the first layer whose input differs: {A.describe(at, self.root)}" if at else ""
                raise EngineUnsupported(
                    "its traced graph computes another output than the model (an in-place update such as "
                    "`h += y` of a tensor another name still refers to, or Python state frozen at trace time)"
                    + where)
        except EngineUnsupported:
            self._restore_state(state)
            raise
        if reference is not None:
            self._verified_modes = self._modes()
        loss0 = loss_fn(out, y).reshape(())
        self.losses.prepare(loss_fn, out, y)
        envc = {n: D.channel_major(v) for n, v in env.items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
        with frozen_buffers(self.root):
            grads, evals = self._estimate(env, envc, y, mu, central, active, full_forward, loss0, chunk)
        return loss0.detach(), grads, evals * x.shape[0]

    def _closed_form_kind(self, node: fx.Node | None, kind: str, env) -> str:
        """The plan's kind, or "layer" where this call's shapes allow no closed form."""
        if node is None or kind in ("model", "layer"):
            return kind
        if len(node.args) != 1 or node.kwargs or not isinstance(env[node.args[0]], torch.Tensor):
            return "layer"
        dims = env[node.args[0]].dim() - 1
        linear = isinstance(self.root.get_submodule(node.target), nn.Linear)
        if dims < 1 or (kind in ("lin_w", "bias") and linear and dims != 1):
            return "layer"   # Linear on [B, ..., F]: no closed form here
        return kind

    def _estimate(self, env, envc, y, mu, central, active, full_forward, loss0, chunk):
        B = env[self.nodes[0]].shape[0]
        grads: list[torch.Tensor] = []
        evals = 0
        prepared: dict[fx.Node, torch.Tensor] = {}
        signs = (1.0, -1.0) if central else (1.0,)
        for (name, p, node, kind), idx in zip(self.plan, active):
            g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            grads.append(g)
            if idx.numel() == 0:
                continue
            kind = self._closed_form_kind(node, kind, env)
            if kind in ("model", "layer"):
                g[idx] = self._inplace(p, idx, node, env, envc, y, mu, central, loss0, full_forward)
                evals += idx.numel() * len(signs)
                continue
            m = self.root.get_submodule(node.target)
            src = node.args[0]
            dims = env[src].dim() - 1
            if kind == "conv_w" and node not in prepared:
                prepared[node] = D.conv_patches(m, env[src], env[node].shape)
            if kind == "bn_w" and node not in prepared:
                prepared[node] = D.bn_normalized_input(m, envc[src])
            width = self._downstream_width(node, env)
            K = chunk or max(1, min(4096, self.max_elems // max(1, B * width)))
            for s in range(0, idx.numel(), K):
                sub = idx[s:s + K]
                losses = []
                for sign in signs:
                    h = sign * mu
                    if kind == "conv_w":
                        rep = D.conv_weight_source(m, sub, h, prepared[node], envc[node])
                    elif kind == "lin_w":
                        rep = D.linear_weight_source(m, sub, h, envc[src], envc[node])
                    elif kind == "bn_w":
                        rep = D.bn_weight_source(sub, h, prepared[node], envc[node], dims)
                    else:
                        rep = D.bias_source(sub, h, envc[node], dims)
                    losses.append(self.evaluate(node, rep, env, envc, y))
                g[sub] = ((losses[0] - losses[1]) / (2 * mu) if central else (losses[0] - loss0) / mu).to(g.dtype)
                evals += sub.numel() * len(signs)
        return grads, evals

    def _inplace(self, p, idx, node, env, envc, y, mu, central, loss0, full_forward) -> torch.Tensor:
        """Perturb ``p`` in place one coordinate at a time; recompute from its layer (or everything)."""
        flat = p.data.view(-1)
        out = torch.empty(idx.numel(), dtype=p.dtype, device=p.device)
        for k, j in enumerate(idx.tolist()):
            old = flat[j].clone()
            vals = []
            for h in ((mu, -mu) if central else (mu,)):
                flat[j] = old + h
                if node is None:
                    vals.append(full_forward().reshape(()))
                else:
                    value = self._run(node, env, None)
                    if any(isinstance(env[a], torch.Tensor) and env[a].untyped_storage().data_ptr()
                           == value.untyped_storage().data_ptr() for a in node.all_input_nodes):
                        value = value.clone()          # never let a later in-place op reach the cache
                    value = D.channel_major(value)
                    vals.append(self.evaluate(node, D.Full(value.unsqueeze(0)), env, envc, y)[0])
            flat[j] = old
            out[k] = (vals[0] - vals[1]) / (2 * mu) if central else (vals[0] - loss0) / mu
        return out
