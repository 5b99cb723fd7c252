"""K perturbations from their source to K losses: the walk down the graph for one chunk.

:meth:`Downstream.evaluate` starts from the rep a chunk of coordinates makes at one node
(:mod:`core.engine.sources`) and visits, in graph order, only the nodes that change can reach.
Each node passes the rep on in the cheapest exact way its :class:`~core.engine.graph.Op` allows:

- a fused block or pool chain (:mod:`core.engine.blocks`) in one pass;
- a layer's closed form (:func:`core.engine.layers.propagate_module`);
- ReLU, element-wise functions and two-operand ops (``x − net(x)``, gates ``a · b``) on the
  changed values only (:func:`core.engine.reps.combine`);
- a BlackBox stage in one call on all K·B perturbed samples;
- anything else (:meth:`Downstream._generic`) once per perturbation, on materialised inputs.

At the output the K losses come from :class:`core.engine.losses.BatchedLoss`.
ReLUs may overwrite a perturbed tensor in place when nothing later reads it; ``share`` groups the
nodes whose perturbed tensors share storage, to know when that is safe.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.engine import layers as L
from core.engine.blocks import chan_through_block, full_through_block
from core.engine.graph import Op
from core.engine.reps import Chan, Full, Rep, apply, batch_major, combine, from_batch_major, materialize, tensor_of
from core.engine.step import StepCache

_FLATTEN = nn.Flatten()
_FLATTEN_RULE = L.rule_for(_FLATTEN)


def _map(a, fn):
    return fx.node.map_aggregate(a, lambda x: fn(x) if isinstance(x, fx.Node) else x)


class Downstream:
    """The propagation half of :class:`core.engine.FastCGE` (which sets the graph attributes used here)."""

    root: nn.Module
    order: dict[fx.Node, int]
    ops: dict[fx.Node, Op]
    rules: dict[fx.Node, L.Rule]                   # each layer's closed form (core.engine.layers.rule_for)
    inplace_modules: set[fx.Node]
    blocks: dict[fx.Node, Any]                     # conv node -> its fused block (core.engine.graph)
    chains: dict[fx.Node, Any]                     # BatchNorm node -> its pool chain
    feeds_block: set[fx.Node]                      # pools read only by a block's conv
    averaged: dict[fx.Node, fx.Node]               # pool -> the global average pool that alone reads it

    def evaluate(self, start: fx.Node, rep: Rep, cache: StepCache, y: Any) -> torch.Tensor:
        """Losses [K] of K perturbations whose effect at node ``start`` is ``rep``."""
        K = rep.K
        changed: dict[fx.Node, Rep] = {start: rep}
        share: dict[fx.Node, list[fx.Node]] = {start: [start]}    # nodes whose perturbed tensors share storage
        skip: set[fx.Node] = set()
        for n in self.after[start]:
            if n in skip:
                continue
            if n.op == "output":
                src = n.args[0]
                if src not in changed:
                    out = cache.env[src]
                    return self.losses(out.unsqueeze(0).expand(K, *out.shape), y)
                return self.losses(batch_major(materialize(changed[src], cache.cm(src))), y)
            if not any(a in changed for a in n.all_input_nodes):
                continue
            fused = self._fused(n, cache, changed)
            if fused is not None:
                last, r, inner = fused
                changed[last], share[last] = r, [last]
                skip.update(inner)
                continue
            r = self._propagate(n, cache, changed, K, share)
            changed[n] = r
            if self.track_sharing:
                self._note_sharing(n, r, changed, share)
        raise AssertionError(f"graph has no output after {start}")

    # -- fused passes ---------------------------------------------------------------------------
    def _fused(self, n: fx.Node, cache: StepCache, changed) -> tuple[fx.Node, Rep, tuple] | None:
        """(last node, its rep, nodes consumed) for a block or pool chain that can run fused; else None.

        The last node is the chain's pool, or for a conv block the global average pool that alone
        reads it (computed in the same pass)."""
        block, chain = self.blocks.get(n), self.chains.get(n)
        chain = block.chain if block is not None else chain
        if chain is None:
            return None
        bn = self.root.get_submodule(chain.bn.target)
        rep = changed.get(n.args[0])
        if rep is None or not cache.monotone(bn):
            return None
        inner = (chain.bn, chain.relu, chain.pool)
        if block is None:
            out = L.bn_relu_maxpool2x2(bn, rep)
            return (chain.pool, out, inner) if out is not None else None
        conv, src = self.root.get_submodule(n.target), n.args[0]
        gap = self.averaged.get(chain.pool)             # a global average pool next: fused too
        last, inner = (gap, inner + (gap,)) if gap is not None else (chain.pool, inner)
        if isinstance(rep, Full) and rep.t.dim() == 5:
            return last, full_through_block(conv, bn, rep.t, cache.scratch(chain.pool), gap is not None), inner
        if not (isinstance(rep, Chan) and rep.v.dim() == 4):
            return None
        B = cache.env[src].shape[0]
        Ho, Wo = cache.env[n].shape[2:]
        out = chan_through_block(bn, rep.v, cache.cm(src), rep.idx, conv, cache.w_by_input(conv),
                                 cache.rows(n, True), (B, Ho, Wo), channels_last=chain.pool in self.feeds_block,
                                 scratch=cache.scratch(chain.pool), mean=gap is not None)
        return last, out, inner

    # -- one node -------------------------------------------------------------------------------
    def _propagate(self, node: fx.Node, cache: StepCache, changed: dict[fx.Node, Rep], K: int,
                   share: dict[fx.Node, list[fx.Node]]) -> Rep:
        op = self.ops[node]
        src = node.args[0] if node.args else None
        if op is Op.BLACKBOX:
            t = batch_major(materialize(changed[src], cache.cm(src)))               # [K, B, ...]
            out = self.root.get_submodule(node.target)(t.reshape(-1, *t.shape[2:]))   # one call, K·B queries
            return Full(from_batch_major(out.reshape(K, -1, *out.shape[1:])))
        single = len(node.args) == 1 and not node.kwargs
        x = cache.env.get(src) if isinstance(src, fx.Node) else None
        if op is Op.MODULE and single and src in changed and isinstance(x, torch.Tensor) and x.dim() >= 1:
            m, rule = self.root.get_submodule(node.target), self.rules.get(node)
            if rule is not None:
                overwrite = (isinstance(m, nn.ReLU) or getattr(m, "inplace", False)) and \
                    self._exclusive(src, node, share)
                rep = rule(m, changed[src], cache.cm(src), cache.cm(node), x.dim() - 1, overwrite)
                if rep is not None:
                    return rep
        elif op is Op.RELU:
            overwrite = self._exclusive(src, node, share)
            return apply(changed[src], lambda a: F.relu(a, inplace=overwrite))
        elif op is Op.BINARY:
            rep = self._binary(node, cache, changed)
            if rep is not None:
                return rep
        elif op is Op.UNARY and src in changed:
            rest, kw = node.args[1:], node.kwargs
            if node.op == "call_method":
                return apply(changed[src], lambda v: getattr(v, node.target)(*rest, **kw))
            return apply(changed[src], lambda v: node.target(v, *rest, **kw))
        elif op is Op.FLATTEN and src in changed:
            rep = _FLATTEN_RULE(_FLATTEN, changed[src], cache.cm(src), cache.cm(node), x.dim() - 1, False)
            if rep is not None:
                return rep
        return self._generic(node, cache, changed, K)

    def _generic(self, node: fx.Node, cache: StepCache, changed: dict[fx.Node, Rep], K: int) -> Full:
        """Any node: run it once per perturbation on materialised inputs (always exact)."""
        full = {n: materialize(r, cache.cm(n)) for n, r in changed.items() if n in node.all_input_nodes}
        outs = []
        for k in range(K):
            def val(n):
                if n not in full:
                    return cache.env[n]
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
            outs.append(out.transpose(0, 1).contiguous() if out.dim() >= 2 else out)
        return Full(torch.stack(outs))

    def _binary(self, node: fx.Node, cache: StepCache, changed: dict[fx.Node, Rep]) -> Rep | None:
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
        env = cache.env
        if ca and cb:
            if env[a].shape != env[b].shape:
                return None
            return Full(fn(materialize(changed[a], cache.cm(a)), materialize(changed[b], cache.cm(b))))
        src, other = (a, b) if ca else (b, a)
        o = env[other] if isinstance(other, fx.Node) else other
        rep = changed[src]
        if isinstance(o, (int, float, bool)) or (isinstance(o, torch.Tensor) and o.dim() == 0):
            return apply(rep, (lambda v: fn(v, o)) if ca else (lambda v: fn(o, v)))
        if isinstance(o, torch.Tensor) and o.shape == env[src].shape and o.dim() >= 1:
            return combine(rep, cache.cm(other), fn, rep_first=ca)
        return None

    # -- storage sharing (for ReLUs that may work in place) ---------------------------------------
    def _exclusive(self, src: fx.Node, node: fx.Node, share: dict[fx.Node, list[fx.Node]]) -> bool:
        """No node after ``node`` reads ``src``'s perturbed tensor (or a view of it): overwriting is safe."""
        if src not in share:
            return False
        return all(u is node or self.order[u] < self.order[node] for a in share[src] for u in a.users)

    @staticmethod
    def _note_sharing(n: fx.Node, r: Rep, changed: dict[fx.Node, Rep], share: dict[fx.Node, list[fx.Node]]) -> None:
        """Group ``n`` with its input when its perturbed tensor is a view or pass-through of it."""
        ins = [a for a in n.all_input_nodes if a in changed]
        if len(ins) == 1 and ins[0] in share and tensor_of(r).untyped_storage().data_ptr() == \
                tensor_of(changed[ins[0]]).untyped_storage().data_ptr():
            share[n] = share[ins[0]]
            share[n].append(n)
        else:
            share[n] = [n]
