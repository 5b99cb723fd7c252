"""The unperturbed forward through the traced graph, and the checks that it is the model's forward.

:class:`GraphRunner` runs the graph once per step and keeps every node's value (the cache all
perturbations restart from), refusing in-place updates that would make that cache stale
(:mod:`core.engine.analysis`). Once per train/eval setting it also runs the model itself, with the
same random draws, and compares: a traced graph can silently compute something else (an alias
updated by ``h += y``, Python state frozen at trace time), and the engine must then refuse.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core.blackbox import BlackBox
from core.engine import analysis as A
from core.engine.graph import is_plain_2x2
from core.engine.layers import maxpool2x2

State = tuple[list, list]


def _map(a, fn):
    return fx.node.map_aggregate(a, lambda x: fn(x) if isinstance(x, fx.Node) else x)


class GraphRunner:
    """Runs ``graph`` (traced from ``root``) node by node; see the module docstring.

    ``inplace``: {in-place node: the node whose value it overwrites} from
    :func:`core.engine.analysis.functionalize`.
    """

    def __init__(self, model: nn.Module, root: nn.Module, nodes: list[fx.Node],
                 inplace: dict[fx.Node, fx.Node]) -> None:
        self.model, self.root, self.nodes, self.inplace = model, root, nodes, inplace
        self.order = {n: i for i, n in enumerate(nodes)}
        self.inplace_modules = {n for n in inplace if n.op == "call_module"}
        self.has_blackbox = any(isinstance(m, BlackBox) for m in model.modules())

    def attr(self, target: str) -> Any:
        obj = self.root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def run(self, node: fx.Node, env: dict[fx.Node, Any], x: torch.Tensor | None) -> Any:
        """``node``'s value from the values of its inputs in ``env`` (``x``: the model's input)."""
        args = _map(node.args, lambda n: env[n])
        kwargs = _map(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            return x
        if node.op == "get_attr":
            return self.attr(node.target)
        if node.op == "call_module":
            m = self.root.get_submodule(node.target)
            if node in self.inplace_modules:            # it overwrites its input: keep the cached one
                args = (args[0].clone(), *args[1:])
            if is_plain_2x2(m) and len(args) == 1 and not kwargs and args[0].dim() >= 3:
                return maxpool2x2(args[0])              # the same maxima, ~15× faster than F.max_pool2d on CPU
            return m(*args, **kwargs)
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
            env[n] = self.run(n, env, x)
            guard.after(n, env)
            guard.record(n, env[n])
        guard.final(env)
        return env

    # -- state a refused estimate must give back ---------------------------------------------------
    def save_state(self) -> State:
        """Buffers and BlackBox query counters, to undo a forward whose estimate is refused."""
        bufs = {id(b): b for m in (self.model, self.root) for b in m.buffers()}
        boxes = [m for m in self.model.modules() if isinstance(m, BlackBox)]
        return [(b, b.detach().clone()) for b in bufs.values()], [(m, m.queries) for m in boxes]

    @staticmethod
    def restore_state(state: State) -> None:
        bufs, boxes = state
        with torch.no_grad():
            for b, v in bufs:
                b.copy_(v)
        for m, q in boxes:
            m.queries = q

    # -- the graph against the model ---------------------------------------------------------------
    def model_output(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, dict]:
        """The model's own output and each layer's inputs, with the same random draws as the graph's."""
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
        self.restore_state(state)
        return out, seen

    def first_divergence(self, env: dict[fx.Node, Any], seen: dict[nn.Module, list]) -> fx.Node | None:
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
