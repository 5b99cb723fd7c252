"""Exact coordinate-wise gradient estimation, fast: the same numbers as the naive CGE loop.

The naive loop (DeepZero, Chen et al. 2024, Eq. 3) runs one full forward per coordinate. This
engine gets the same losses by

1. **layer-level feature reuse**: one unperturbed forward caches every node's value of the
   traced graph (:mod:`core.engine.forward`); a perturbation recomputes only the nodes its layer
   reaches (the paper reuses features per block, here per layer);
2. **delta forward**: a coordinate changes one channel or unit of its layer's output in closed
   form (:mod:`core.engine.sources`); channel-wise layers keep that compact, and the next conv adds
   a one-input-channel convolution of the change (:mod:`core.engine.layers`);
3. **batched perturbations**: K coordinates travel as one batch (:mod:`core.engine.propagate`),
   train-mode BatchNorm normalising each with its own statistics;
4. **fused blocks**: Conv2d → BatchNorm2d → ReLU → MaxPool2d(2) runs as one pass over rows in
   2×2-window-major order (:mod:`core.engine.blocks`, :mod:`core.engine.windows`).
5. **no work where the answer is known**: a conv or linear bias read only by a BatchNorm that
   normalises with the batch's statistics (train mode) changes nothing (BN subtracts the shifted
   mean), so its coordinates get exactly 0 without an evaluation (:mod:`core.engine.planning`).

Worked trace: one coordinate of the second conv of the paper's depth-3 CNN on MNIST (B = 64;
[conv 3×3 18ch → BN → ReLU → maxpool 2] × 3, global average pool, Linear(18, 10)), the weight
W2[o=5, c=3, i=1, j=2], flat index 5·162 + 3·9 + 1·3 + 2 = 842, forward difference h = μ. Shapes
are for this one coordinate; the K coordinates of a chunk add a leading K to every tensor.

0. :meth:`FastCGE.estimate` runs the caching forward once (``env``: every node's value);
   :meth:`FastCGE._estimate_param` takes W2's coordinates K at a time (the per-shape plan,
   :mod:`core.engine.planning`, chose K = 83 here on a CPU: the widest value a perturbation makes
   is its conv2 channel, 14·14 per sample, as the fused loops never materialise conv3's rows).
1. :func:`core.engine.sources.source`: conv2 starts a fused block (conv2 → BN2 → ReLU → pool2), so
   the new conv2 channel 5 is row 5 of conv2's cached output plus h × row 3·9 + 1·3 + 2 = 32 of the
   im2col of conv2's input (:class:`~core.engine.step.StepCache`), both [12,544] = 64·14·14 in
   window-major order.
2. :func:`core.engine.blocks.chan_from_terms`: one loop (:mod:`core.engine.kernels`) reads the two
   rows once, forming the new row and its Σx, Σx² (BN2's statistics) and its 2×2 maxima, the
   maxima of the row's four quarters (3,136 values); scale, shift and ReLU run on those:
   ``Chan(idx=[5], v=[1, 64, 7, 7])`` at pool2.
3. :meth:`core.engine.propagate.Downstream.evaluate` walks on from pool2. conv3 starts a block
   whose input changed in one channel, so :func:`core.engine.blocks.chan_through_block`:
   the compiled loop forms δ = v − pool2's cached channel 5 [3,136] and gathers, into
   cache-resident buffers, the 4×4 input patch of each of the 576 2×2 windows of conv3's 7×7
   output (V [16, 576], :func:`core.engine.windows.window_patches`) and the im2col of the 13·64
   positions no window covers (T [9, 832]). For each of conv3's 18 output channels o it forms
   conv3's cached row o + Σ_t W3[o, 5, t] · (δ shifted by tap t) (2·18·9·3,136 = 1.0 MFLOP in all)
   together with its Σx, Σx² and 2×2 maxima, without writing the [18, 3,136] rows out; then BN3's
   scale, shift and ReLU on the maxima [18, 576] and, as a global average pool reads pool3 alone,
   their mean per sample: ``Full(t=[1, 18, 64, 1, 1])`` at the average pool. Without the loops
   (GPU, no Numba): one ``bmm`` writes the rows, ``sum``, ``vector_norm`` and ``amax`` read them,
   and a mean pools them.
4. :mod:`core.engine.layers`: flatten → [1, 18, 64], Linear → logits [1, 10, 64]
   (2·10·18·64 = 23 kFLOP).
5. :class:`core.engine.losses.BatchedLoss`: closed-form cross-entropy ℓ [1]; ĝ_842 = (ℓ − ℓ0) / μ.

Parameters without a closed form (custom modules, shared weights, parameters used functionally)
are perturbed in place, one coordinate at a time, recomputing from their layer (or the whole
model). What the engine cannot reproduce exactly — more than one input, a non-tensor value
downstream of a perturbed layer (``nn.GRU``, a dict output), an in-place update it cannot make
out-of-place, a graph that computes another output than the model — raises
:class:`core.engine.EngineUnsupported` before any perturbation, with buffers restored (see
:mod:`core.engine.analysis`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from core.engine import EngineUnsupported
from core.engine import analysis as A
from core.engine import graph as G
from core.engine import layers as L
from core.engine.forward import GraphRunner
from core.engine.losses import BatchedLoss
from core.engine.planning import ShapePlanner
from core.engine.propagate import Downstream
from core.engine.reps import Full, channel_major
from core.engine.sources import SourcePlan, source
from core.engine.step import StepCache
from core.estimators.base import frozen_buffers

trace_model = G.trace_model


class FastCGE(Downstream):
    """The engine behind :class:`core.CGE` for supervised losses ``loss_fn(model(x), y)``.

    Args:
        model: the model; its parameters are read live (no copies).
        named_params: the owned parameters ``[(name, p)]``.
        max_elems: bound on the elements of one batched downstream activation; sets K (None:
            2**20 on a CPU, 2**24 on a GPU).

    Raises:
        EngineUnsupported: the graph has more than one input, returns a literal tuple/dict, or
            changes a value in place in a way the engine cannot make out-of-place.
    """

    def __init__(self, model: nn.Module, named_params: list[tuple[str, nn.Parameter]], *,
                 max_elems: int | None = None) -> None:
        self.model, self.named_params = model, named_params
        self.max_elems = max_elems
        self.losses = BatchedLoss()
        self._build()

    def _build(self) -> None:
        """Trace, functionalise in-place updates, classify every node and plan every parameter.

        torch.fx freezes Python control flow (``if self.training:``) into the graph, so
        :meth:`estimate` rebuilds when a module's train/eval flag changed since.
        """
        self._traced_modes = self._modes()
        self._verified_modes: tuple[bool, ...] | None = None
        self.root, graph = G.trace_model(self.model)
        self.nodes: list[fx.Node] = list(graph.nodes)
        inputs = [n.name for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise EngineUnsupported(f"its forward takes {len(inputs)} inputs ({', '.join(inputs)}); "
                                    "the engine feeds exactly one")
        (self.output,) = [n for n in self.nodes if n.op == "output"]
        if not isinstance(self.output.args[0], fx.Node):
            raise EngineUnsupported(f"the model returns a {A.type_name(self.output.args[0])}, not one tensor")
        inplace = A.functionalize(graph, self.root)                 # {in-place node: value it overwrites}
        self.runner = GraphRunner(self.model, self.root, self.nodes, inplace)
        self.order, self.inplace_modules = self.runner.order, self.runner.inplace_modules
        self.ops = {n: G.classify(n, self.root) for n in self.nodes}
        self.rules = {n: rule for n in self.nodes if self.ops[n] is G.Op.MODULE
                      and (rule := L.rule_for(self.root.get_submodule(n.target))) is not None}
        self.chains, self.blocks = G.find_blocks(self.nodes, self.root, inplace)
        # pools whose one reader is a fused block's conv: their perturbed values go channels-last
        self.feeds_block = {c.pool for c in self.chains.values()
                            if len(c.pool.users) == 1 and next(iter(c.pool.users)) in self.blocks}
        self.averaged = G.averaged_pools(self.chains, self.root, inplace)   # pool -> its global average
        self.after = _Descendants(self.nodes)
        self.params = self._owners()
        in_chains = {n for c in self.chains.values() for n in (c.relu,)}
        # storage sharing between perturbed tensors only matters where a ReLU may overwrite its input
        self.track_sharing = any(n not in in_chains and (self.ops[n] is G.Op.RELU or n in self.inplace_modules
                                 or isinstance(self._module(n), nn.ReLU)) for n in self.nodes)
        owners = {p.node for p in self.params if p.node is not None}
        affected = A.affected_nodes(self.nodes, owners)
        self.affected = [n for n in self.nodes if n in affected]     # graph order
        self.planner = ShapePlanner(self)

    def _module(self, n: fx.Node) -> nn.Module | None:
        return self.root.get_submodule(n.target) if n.op == "call_module" else None

    def _owners(self) -> list[SourcePlan]:
        """Each owned parameter's layer and :class:`~core.engine.graph.Coord` (shapes aside)."""
        users: dict[int, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                for p in self.root.get_submodule(n.target).parameters(recurse=True):
                    users.setdefault(id(p), []).append(n)
            elif n.op == "get_attr":
                users.setdefault(id(self.runner.attr(n.target)), []).append(n)
        plans = []
        for name, p in self.named_params:
            owners = users.get(id(p), [])
            if len(owners) != 1 or owners[0].op != "call_module":
                plans.append(SourcePlan(name, p, G.Coord.MODEL))           # shared/functional: full forward
                continue
            m = self.root.get_submodule(owners[0].target)
            plans.append(SourcePlan(name, p, G.coord_kind(m, p), owners[0], m))
        return plans

    def _modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self.model.modules())

    def units(self, x: torch.Tensor, chunk: int | None, central: bool) -> list[int] | None:
        """Per owned parameter, the coordinates :meth:`estimate` evaluates in one batch on ``x``
        (:meth:`core.engine.planning.ShapePlanner.units`); None until planned for this shape and mode."""
        return None if self._modes() != self._traced_modes else self.planner.units(x, chunk, central)

    # -- the estimate ------------------------------------------------------------------------------
    def estimate(self, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, mu: float, central: bool,
                 active: list[torch.Tensor], full_forward: Callable[[], torch.Tensor],
                 chunk: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """Returns (unperturbed loss, gradient per owned parameter (flat), perturbed evaluations · B).

        ``active[i]``: flat indices of the coordinates of owned parameter i to estimate (the others
        get 0). ``full_forward()``: the loss of the model as it is (for parameters without a closed
        form). ``chunk``: perturbations evaluated together (None: chosen per parameter).

        Raises:
            EngineUnsupported: decided before any perturbation, with buffers (BN running stats)
                and BlackBox counters restored to their values before the call.
        """
        if self._modes() != self._traced_modes:
            self._build()                               # train/eval switched: trace again
        runner = self.runner
        state = runner.save_state()
        verify = not runner.has_blackbox and self._verified_modes != self._modes()
        reference = runner.model_output(x, state) if verify else None
        try:
            env = runner.forward_cached(x)
            A.check_values(env, self.affected, self.root)
            out = env[self.output]
            if not isinstance(out, torch.Tensor):
                raise EngineUnsupported(f"the model returns a {A.type_name(out)}, not one tensor")
            if reference is not None and not A.outputs_match(out, reference[0]):
                at = runner.first_divergence(env, reference[1])
                where = f"; the first layer whose input differs: {A.describe(at, self.root)}" if at else ""
                raise EngineUnsupported(
                    "its traced graph computes another output than the model (an in-place update such as "
                    "`h += y` of a tensor another name still refers to, or Python state frozen at trace time)"
                    + where)
        except EngineUnsupported:
            runner.restore_state(state)
            raise
        if reference is not None:
            self._verified_modes = self._modes()
        loss0 = loss_fn(out, y).reshape(())
        self.losses.prepare(loss_fn, out, y)
        cache = StepCache(env, self.root)
        plans = self.planner.plan(x, env, chunk)
        with frozen_buffers(self.root):
            grads, evals = [], 0
            for plan, idx in zip(plans, active):
                g = torch.zeros(plan.param.numel(), dtype=plan.param.dtype, device=plan.param.device)
                grads.append(g)
                if plan.coord is G.Coord.ABSORBED:            # exactly 0 (NaN when the loss is)
                    g[idx.to(g.device)] = ((loss0 - loss0) / mu).to(g.dtype)
                elif idx.numel():
                    idx = idx.to(g.device)
                    self._estimate_param(plan, idx, g, cache, y, mu, central, loss0, full_forward)
                    evals += idx.numel() * (2 if central else 1)
        return loss0.detach(), grads, evals * x.shape[0]

    def _estimate_param(self, plan: SourcePlan, idx: torch.Tensor, g: torch.Tensor, cache: StepCache, y,
                        mu: float, central: bool, loss0: torch.Tensor, full_forward) -> None:
        """Fill ``g[idx]`` for one parameter, ``plan.chunk`` perturbations at a time."""
        if plan.coord in (G.Coord.LAYER, G.Coord.MODEL):
            g[idx] = self._inplace(plan, idx, cache, y, mu, central, loss0, full_forward)
            return
        step = max(1, plan.chunk // 2) if central else plan.chunk   # central: +μ and −μ in one batch
        plus = torch.full((min(step, idx.numel()),), mu, dtype=cache.env[plan.node].dtype, device=g.device)
        diffs = []
        for s in range(0, idx.numel(), step):
            sub = idx[s:s + step]
            k = sub.numel()
            h = plus[:k]
            if central:
                sub, h = torch.cat([sub, sub]), torch.cat([h, -h])
            start, rep = source(plan, sub, h, cache)
            losses = self.evaluate(start, rep, cache, y)
            diffs.append((losses[:k] - losses[k:]) / (2 * mu) if central else (losses - loss0) / mu)
        g[idx] = torch.cat(diffs).to(g.dtype)

    def _inplace(self, plan: SourcePlan, idx: torch.Tensor, cache: StepCache, y, mu: float, central: bool,
                 loss0: torch.Tensor, full_forward) -> torch.Tensor:
        """Perturb the parameter in place one coordinate at a time; recompute from its layer (or everything)."""
        p, node, env = plan.param, plan.node, cache.env
        flat = p.data.view(-1)
        out = torch.empty(idx.numel(), dtype=p.dtype, device=p.device)
        for k, j in enumerate(idx.tolist()):
            old = flat[j].clone()
            vals = []
            for h in ((mu, -mu) if central else (mu,)):
                flat[j] = old + h
                if plan.coord is G.Coord.MODEL:
                    vals.append(full_forward().reshape(()))
                else:
                    value = self.runner.run(node, env, None)
                    if any(isinstance(env[a], torch.Tensor) and env[a].untyped_storage().data_ptr()
                           == value.untyped_storage().data_ptr() for a in node.all_input_nodes):
                        value = value.clone()          # never let a later in-place op reach the cache
                    vals.append(self.evaluate(node, Full(channel_major(value).unsqueeze(0)), cache, y)[0])
            flat[j] = old
            out[k] = (vals[0] - vals[1]) / (2 * mu) if central else (vals[0] - loss0) / mu
        return out


class _Descendants(dict):
    """``after[start]``: the nodes a change at ``start`` reaches, in graph order (computed on first use)."""

    def __init__(self, nodes: list[fx.Node]) -> None:
        super().__init__()
        self.nodes = nodes

    def __missing__(self, start: fx.Node) -> list[fx.Node]:
        self[start] = G.descendants(self.nodes, start)
        return self[start]
