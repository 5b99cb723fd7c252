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
                 max_elems: int = 1 << 20) -> None:
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

    def _bn_relu_pool_chains(self) -> dict[fx.Node, tuple[fx.Node, fx.Node]]:
        """BatchNorm2d nodes whose only user is a ReLU whose only user is a plain 2×2 max-pool."""
        def module(n):
            return self.root.get_submodule(n.target) if n.op == "call_module" else None

        chains = {}
        for n in self.nodes:
            if not isinstance(module(n), nn.BatchNorm2d) or len(n.users) != 1:
                continue
            (relu,) = n.users
            is_relu = isinstance(module(relu), nn.ReLU) or (
                relu.op == "call_function" and relu.target in _RELU and not relu.kwargs) or (
                relu.op == "call_method" and relu.target == "relu")
            if not is_relu or len(relu.args) != 1 or len(relu.users) != 1:
                continue
            (pool,) = relu.users
            if D._is_plain_2x2(module(pool)) and len(pool.args) == 1 and not pool.kwargs:
                chains[n] = (relu, pool)
        return chains

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
    def _generic(self, node: fx.Node, env, envc, changed: dict[fx.Node, D.Rep], K: int) -> D.Full:
        """Any node: run it once per perturbation on materialised inputs (always exact)."""
        full = {n: D.materialize(r, envc[n]) for n, r in changed.items() if n in node.all_input_nodes}
        outs = []
        for k in range(K):
            def val(n):
                if n not in full:
                    return env[n]
                t = full[n][k]
                return t.transpose(0, 1) if t.dim() >= 2 else t
            args, kwargs = _map(node.args, val), _map(node.kwargs, val)
            if node.op == "call_module":
                out = self.root.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                out = node.target(*args, **kwargs)
            else:
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            outs.append(D.channel_major(out))
        return D.Full(torch.stack(outs))

    def _propagate_node(self, node: fx.Node, env, envc, changed: dict[fx.Node, D.Rep], K: int) -> D.Rep | None:
        if not any(n in changed for n in node.all_input_nodes):
            return None
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return None  # shapes do not change
        if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
            return None
        single = len(node.args) == 1 and not node.kwargs
        if node.op == "call_module":
            m = self.root.get_submodule(node.target)
            src = node.args[0] if node.args else None
            if isinstance(m, BlackBox) and single:
                t = D.batch_major(D.materialize(changed[src], envc[src]))          # [K, B, ...]
                out = m(t.reshape(-1, *t.shape[2:]))                                # one call, K·B queries
                return D.Full(D.from_batch_major(out.reshape(K, -1, *out.shape[1:])))
            if single and src in changed and isinstance(env[src], torch.Tensor):
                rep = D.propagate_module(m, changed[src], envc[src], envc[node], env[src].dim() - 1,
                                         inplace=len(src.users) == 1)
                if rep is not None:
                    return rep
        elif node.op == "call_function" and node.target in _ADD and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                if a in changed and b in changed:
                    return D.Full(D.materialize(changed[a], envc[a]) + D.materialize(changed[b], envc[b]))
                src, other = (a, b) if a in changed else (b, a)
                rep, o = changed[src], envc[other]
                if isinstance(o, torch.Tensor) and env[other].shape == env[src].shape:
                    if isinstance(rep, D.Chan):
                        return D.Chan(rep.idx, rep.v + o.index_select(0, rep.idx))
                    if isinstance(rep, D.Feat):
                        return D.Feat(rep.cols, rep.v + o[rep.cols])
                    return D.Full(rep.t + o.unsqueeze(0))
        elif ((node.op == "call_function" and node.target in _RELU) or (
                node.op == "call_method" and node.target == "relu")) and single:
            return D.apply(changed[node.args[0]],
                           lambda a: F.relu(a, inplace=len(node.args[0].users) == 1))
        elif (node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            src = node.args[0]
            if start == 1 and len(node.args) <= 2 and set(node.kwargs) <= {"start_dim"}:
                rep = D.propagate_module(nn.Flatten(), changed[src], envc[src], envc[node], env[src].dim() - 1)
                if rep is not None:
                    return rep
        return self._generic(node, env, envc, changed, K)

    @staticmethod
    def _is_plain_cross_entropy(loss_fn: Callable) -> bool:
        if loss_fn is F.cross_entropy:
            return True
        return (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.reduction == "mean"
                and loss_fn.label_smoothing == 0.0)

    def _losses(self, loss_fn: Callable, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Losses [K] from the perturbed outputs ``out`` [K, B, ...]."""
        if (out.dim() == 3 and y.dim() == 1 and not y.is_floating_point() and bool((y >= 0).all())
                and self._is_plain_cross_entropy(loss_fn)):
            # mean cross-entropy of every perturbation at once: logsumexp − the true class's logit
            picked = out.gather(2, y.view(1, -1, 1).expand(out.shape[0], -1, 1)).squeeze(2)
            return (torch.logsumexp(out, dim=2) - picked).mean(1)
        if self._vmap_ok is not False:
            try:
                losses = torch.vmap(loss_fn, in_dims=(0, None))(out, y)
                self._vmap_ok = True
                return losses.reshape(-1)
            except Exception:
                self._vmap_ok = False
        return torch.stack([loss_fn(out[k], y).reshape(()) for k in range(out.shape[0])])

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

    def evaluate(self, node: fx.Node, rep: D.Rep, env, envc, loss_fn, y) -> torch.Tensor:
        """Losses [K] of K perturbations whose effect at ``node`` is ``rep``."""
        K = rep.K
        changed: dict[fx.Node, D.Rep] = {node: rep}
        done: set[fx.Node] = set()
        for n in self.nodes[self.order[node] + 1:]:
            if n in done:
                continue
            if n in self.fused and n.args[0] in changed:
                r = D.bn_relu_maxpool2x2(self.root.get_submodule(n.target), changed[n.args[0]])
                if r is not None:
                    relu, pool = self.fused[n]
                    changed[pool] = r
                    done.update((relu, pool))
                    continue
            if n.op == "output":
                src = n.args[0]
                if src not in changed:
                    return self._losses(loss_fn, env[src].unsqueeze(0).expand(K, *env[src].shape), y)
                return self._losses(loss_fn, D.batch_major(D.materialize(changed[src], envc[src])), y)
            r = self._propagate_node(n, env, envc, changed, K)
            if r is not None:
                changed[n] = r
        raise AssertionError(f"graph has no output after {node}")

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
        envc = {n: D.channel_major(v) for n, v in env.items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
        with frozen_buffers(self.root):
            grads, evals = self._estimate(env, envc, loss_fn, y, mu, central, active, full_forward, loss0, chunk)
        return loss0.detach(), grads, evals * x.shape[0]

    def _estimate(self, env, envc, loss_fn, y, mu, central, active, full_forward, loss0, chunk):
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
            dims = env[node.args[0]].dim() - 1 if node is not None else 0
            if kind in ("lin_w", "bias") and isinstance(self.root.get_submodule(node.target), nn.Linear) \
                    and dims != 1:
                kind = "layer"   # Linear on [B, ..., F]: no closed form here
            if kind in ("model", "layer"):
                g[idx] = self._inplace(p, idx, node, env, envc, loss_fn, y, mu, central, loss0, full_forward)
                evals += idx.numel() * len(signs)
                continue
            m = self.root.get_submodule(node.target)
            src = node.args[0]
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
                    losses.append(self.evaluate(node, rep, env, envc, loss_fn, y))
                g[sub] = ((losses[0] - losses[1]) / (2 * mu) if central else (losses[0] - loss0) / mu).to(g.dtype)
                evals += sub.numel() * len(signs)
        return grads, evals

    def _inplace(self, p, idx, node, env, envc, loss_fn, y, mu, central, loss0, full_forward) -> torch.Tensor:
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
                    value = D.channel_major(self._run(node, env, None))
                    vals.append(self.evaluate(node, D.Full(value.unsqueeze(0)), env, envc, loss_fn, y)[0])
            flat[j] = old
            out[k] = (vals[0] - vals[1]) / (2 * mu) if central else (vals[0] - loss0) / mu
        return out
