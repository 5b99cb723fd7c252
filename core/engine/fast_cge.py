"""Exact coordinate-wise gradient estimation, fast.

Produces the same numbers as the naive CGE loop (one perturbed forward per coordinate) by

1. **layer-level feature reuse**: the model is traced to a graph of layers (torch.fx; an
   ``nn.Sequential``, any traceable model, or a model listing its stages in ``zo_stages()``); one
   unperturbed forward caches every node's value, and a perturbation only recomputes the nodes
   that depend on its layer (DeepZero, Chen et al. 2024, reuses features per block; here per layer);
2. **delta forward** (:mod:`core.engine.delta`): a Conv2d/Linear/BN coordinate changes a single
   output channel or unit by a closed form of the cached input, the channel-wise layers after it
   process that channel only, and the next Conv/Linear adds a one-channel convolution of the change;
3. **batched perturbations**: K coordinates travel together through the downstream layers as one
   batch of K·B samples (with per-perturbation BatchNorm statistics in train mode).

Layers without a closed form (custom modules, shared weights, parameters used functionally) fall
back to perturbing the parameter in place and recomputing from its layer (or the whole model).
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
from core.engine import delta as D
from core.estimators.base import frozen_buffers

_SHAPE_METHODS = {"size", "dim"}
_ADD = {operator.add, torch.add, operator.iadd}
_RELU = {F.relu, torch.relu}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BlackBox) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module) -> tuple[nn.Module, fx.Graph] | None:
    """(root, graph) of the model's layers, or None when it cannot be traced."""
    root = nn.Sequential(*model.zo_stages()) if hasattr(model, "zo_stages") else model
    try:
        graph = _Tracer().trace(root)
    except Exception:
        return None
    return root, graph


def _map(a, fn):
    return fx.node.map_aggregate(a, lambda x: fn(x) if isinstance(x, fx.Node) else x)


class FastCGE:
    """The engine behind :class:`core.CGE` for supervised losses ``loss_fn(model(x), y)``.

    Args:
        model: the model; its parameters are read live (no copies).
        named_params: the owned parameters ``[(name, p)]``.
        max_elems: bound on the elements of one batched downstream activation; sets K.
    """

    def __init__(self, model: nn.Module, named_params: list[tuple[str, nn.Parameter]], *,
                 max_elems: int = 1 << 24) -> None:
        traced = trace_model(model)
        if traced is None:
            raise TypeError("model is not traceable")
        self.root, self.graph = traced
        self.nodes: list[fx.Node] = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.max_elems = max_elems
        self._vmap_ok: bool | None = None
        out = [n for n in self.nodes if n.op == "output"]
        if len(out) != 1:
            raise TypeError("graph must have one output")
        # which node owns each parameter, and how it is perturbed
        users: dict[int, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                for p in self.root.get_submodule(n.target).parameters(recurse=True):
                    users.setdefault(id(p), []).append(n)
            elif n.op == "get_attr":
                users.setdefault(id(self._attr(n.target)), []).append(n)
        self.plan: list[tuple[str, nn.Parameter, fx.Node | None, str]] = []
        for name, p in named_params:
            owners = users.get(id(p), [])
            if len(owners) != 1 or owners[0].op != "call_module":
                self.plan.append((name, p, None, "model"))         # shared/functional: full forward
                continue
            node = owners[0]
            m = self.root.get_submodule(node.target)
            self.plan.append((name, p, node, self._kind(m, p)))

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
            return self.root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return args[0]  # output

    def forward_cached(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        if sum(n.op == "placeholder" for n in self.nodes) != 1:
            raise TypeError("model must take exactly one input")
        env: dict[fx.Node, Any] = {}
        for n in self.nodes:
            env[n] = self._run(n, env, x)
        return env

    # -- perturbed propagation -------------------------------------------------------------------
    def _generic(self, node: fx.Node, env, changed: dict[fx.Node, D.Rep], K: int) -> D.Full:
        """Any node: run it once per perturbation on materialised inputs (always exact)."""
        full = {n: D.materialize(r, env[n]) for n, r in changed.items() if n in self._inputs(node)}
        outs = []
        for k in range(K):
            def val(n):
                return full[n][k] if n in full else env[n]
            args, kwargs = _map(node.args, val), _map(node.kwargs, val)
            if node.op == "call_module":
                outs.append(self.root.get_submodule(node.target)(*args, **kwargs))
            elif node.op == "call_function":
                outs.append(node.target(*args, **kwargs))
            else:
                outs.append(getattr(args[0], node.target)(*args[1:], **kwargs))
        return D.Full(torch.stack(outs))

    @staticmethod
    def _inputs(node: fx.Node) -> list[fx.Node]:
        return list(node.all_input_nodes)

    def _propagate_node(self, node: fx.Node, env, changed: dict[fx.Node, D.Rep], K: int) -> D.Rep | None:
        ins = [n for n in self._inputs(node) if n in changed]
        if not ins:
            return None
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return None  # shapes do not change
        if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
            return None
        if node.op == "call_module":
            m = self.root.get_submodule(node.target)
            if isinstance(m, BlackBox) and len(node.args) == 1 and not node.kwargs:
                t = D.materialize(changed[node.args[0]], env[node.args[0]])
                out = m(t.reshape(-1, *t.shape[2:]))                        # one call, K·B queries
                return D.Full(out.reshape(K, -1, *out.shape[1:]))
            if len(node.args) == 1 and not node.kwargs and node.args[0] in changed:
                rep = D.propagate_module(m, changed[node.args[0]], env[node.args[0]], env[node])
                if rep is not None:
                    return rep
        elif node.op == "call_function" and node.target in _ADD and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                if a in changed and b in changed:
                    return D.Full(D.materialize(changed[a], env[a]) + D.materialize(changed[b], env[b]))
                src, other = (a, b) if a in changed else (b, a)
                rep, o = changed[src], env[other]
                if isinstance(o, torch.Tensor) and o.shape == env[src].shape:
                    if isinstance(rep, D.Chan):
                        return D.Chan(rep.idx, rep.v + D.channel_of(o, rep.idx))
                    if isinstance(rep, D.Feat):
                        return D.Feat(rep.cols, rep.v + D.columns_of(o, rep.cols))
                    return D.Full(rep.t + o.unsqueeze(0))
        elif (node.op == "call_function" and node.target in _RELU) or (
                node.op == "call_method" and node.target == "relu"):
            rep = changed[node.args[0]]
            if len(node.args) == 1 and not node.kwargs:
                if isinstance(rep, D.Full):
                    return D.Full(F.relu(rep.t))
                return D.Chan(rep.idx, F.relu(rep.v)) if isinstance(rep, D.Chan) else D.Feat(rep.cols, F.relu(rep.v))
        elif (node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start == 1 and len(node.args) <= 2 and set(node.kwargs) <= {"start_dim"}:
                rep = D.propagate_module(nn.Flatten(), changed[node.args[0]], env[node.args[0]], env[node])
                if rep is not None:
                    return rep
        return self._generic(node, env, changed, K)

    def _losses(self, loss_fn: Callable, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._vmap_ok is not False:
            try:
                losses = torch.vmap(loss_fn, in_dims=(0, None))(out, y)
                self._vmap_ok = True
                return losses.reshape(-1)
            except Exception:
                self._vmap_ok = False
        return torch.stack([loss_fn(out[k], y).reshape(()) for k in range(out.shape[0])])

    def _downstream_width(self, node: fx.Node, env) -> int:
        """Largest per-sample activation after ``node`` (bounds the chunk size K)."""
        start = self.order[node]
        sizes = [env[n][0].numel() for n in self.nodes[start:] if isinstance(env.get(n), torch.Tensor)
                 and env[n].dim() > 0]
        return max(sizes) if sizes else 1

    def evaluate(self, node: fx.Node, rep: D.Rep, env, loss_fn, y) -> torch.Tensor:
        """Losses [K] of K perturbations whose effect at ``node`` is ``rep``."""
        K = rep.K
        changed: dict[fx.Node, D.Rep] = {node: rep}
        out_node = self.nodes[-1]
        for n in self.nodes[self.order[node] + 1:]:
            if n.op == "output":
                src = n.args[0]
                if src not in changed:
                    return self._losses(loss_fn, env[src].unsqueeze(0).expand(K, *env[src].shape), y)
                return self._losses(loss_fn, D.materialize(changed[src], env[src]), y)
            r = self._propagate_node(n, env, changed, K)
            if r is not None:
                changed[n] = r
        raise AssertionError(f"graph has no output after {node} ({out_node})")

    # -- the estimate ------------------------------------------------------------------------------
    def estimate(self, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, mu: float, central: bool,
                 active: list[torch.Tensor], full_forward: Callable[[], torch.Tensor],
                 chunk: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """Returns (unperturbed loss, gradient per owned parameter (flat), perturbed evaluations)."""
        env = self.forward_cached(x)
        out = env[self.nodes[-1]]
        if not isinstance(out, torch.Tensor):
            raise TypeError("model output is not a tensor")
        loss0 = loss_fn(out, y).reshape(())
        with frozen_buffers(self.root):
            grads, evals = self._estimate(env, loss_fn, y, mu, central, active, full_forward, loss0, chunk)
        return loss0.detach(), grads, evals * x.shape[0]

    def _estimate(self, env, loss_fn, y, mu, central, active, full_forward, loss0, chunk):
        B = env[self.nodes[0]].shape[0]
        grads: list[torch.Tensor] = []
        evals = 0
        patches: dict[fx.Node, torch.Tensor] = {}
        xhats: dict[fx.Node, torch.Tensor] = {}
        signs = (1.0, -1.0) if central else (1.0,)
        for (name, p, node, kind), idx in zip(self.plan, active):
            g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            if idx.numel() == 0:
                grads.append(g)
                continue
            if kind in ("model", "layer"):
                g[idx] = self._inplace(p, idx, node, env, loss_fn, y, mu, central, loss0, full_forward)
                evals += idx.numel() * len(signs)
                grads.append(g)
                continue
            m = self.root.get_submodule(node.target)
            cin, cout = env[node.args[0]], env[node]
            if kind == "conv_w" and node not in patches:
                patches[node] = F.unfold(cin, m.kernel_size, m.dilation, m.padding, m.stride)
            if kind == "bn_w" and node not in xhats:
                xhats[node] = D.bn_normalized_input(m, cin)
            width = self._downstream_width(node, env)
            K = chunk or max(1, min(4096, self.max_elems // max(1, B * width)))
            for s in range(0, idx.numel(), K):
                sub = idx[s:s + K]
                losses = []
                for sign in signs:
                    h = sign * mu
                    if kind == "conv_w":
                        rep = D.conv_weight_source(m, sub, h, patches[node], cout)
                    elif kind == "lin_w":
                        rep = D.linear_weight_source(m, sub, h, cin, cout)
                    elif kind == "bn_w":
                        rep = D.bn_weight_source(sub, h, xhats[node], cout)
                    else:
                        rep = D.bias_source(sub, h, cout)
                    losses.append(self.evaluate(node, rep, env, loss_fn, y))
                g[sub] = ((losses[0] - losses[1]) / (2 * mu) if central else (losses[0] - loss0) / mu).to(g.dtype)
                evals += sub.numel() * len(signs)
            grads.append(g)
        return grads, evals

    def _inplace(self, p, idx, node, env, loss_fn, y, mu, central, loss0, full_forward) -> torch.Tensor:
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
                    vals.append(self.evaluate(node, D.Full(value.unsqueeze(0)), env, loss_fn, y)[0])
            flat[j] = old
            out[k] = (vals[0] - vals[1]) / (2 * mu) if central else (vals[0] - loss0) / mu
        return out
