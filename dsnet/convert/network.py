"""``make_dynamic``: any traceable PyTorch CNN as a dsnet dynamic network.

The network is traced with torch.fx and its channel groups are found
(:mod:`dsnet.layers.channel_groups`). Every ``Conv2d``, ``BatchNorm2d`` and
``Linear`` is replaced by its sliced counterpart holding the same weights,
the double-headed gate is inserted after the module ``gate_after`` names, and
the traced graph is regenerated once per sub-network with that sub-network's
widths written into the calls (``conv(x, 48)``, ``bn(x, slot)``): the result
runs as fast as hand-written code and has the whole :class:`DynamicNet` API
(training, routing, extraction, MACs, benchmarks, export).

**Widths.** Each group that slices is a *stage* of the sub-network table,
named after the first layer that writes it. Groups the gate's input depends
on run before the gate, once per batch, at ``pre_gate_ratio`` of their width
(default: the slimmest ratio, as dsnet's own models); groups after the gate
take the ``i``-th of ``width_ratios`` in routed sub-network ``i``. Widths are
rounded to multiples of 8 (4, 2 or 1 for groups too narrow to give distinct
multiples of 8). The full network (every group at full width) is the last
sub-network; with the default pre-gate ratio it is the training-only largest.

**The same function at full width.** The sliced layers hold the original
weights, every BatchNorm statistics slot starts from the original statistics,
and the gate's attention head starts as the identity
(:meth:`~dsnet.layers.gate.DynamicGate.init_identity_attention`), so in eval
mode the largest sub-network computes what the original network computes
(up to the float summation order of the importance permutation).

**Concatenation.** If both parts of ``cat([a, b])`` slice, the prefix of the
concatenated channels is not a prefix of each part. [ours] The parts are laid
out interleaved by width level: ``a[:a0], b[:b0], a[a0:a1], b[b0:b1], ...``
where ``(a_j, b_j)`` are the parts' widths in sub-network ``j``; every
sub-network's channels are then a prefix, and the layers that read the
concatenation get their input columns in that order. The regenerated graph
builds this layout from slices of the parts.

**BatchNorm statistics.** A BatchNorm before the gate uses the statistics
slot of the pre-gate widths (shared by every routed sub-network); one after
the gate has private statistics per sub-network.

**Gate placement.** The gate sits on the output of ``gate_after``, which must
cut the network in two: everything after the gate may read only the gate's
output (a skip connection around the gate would need the pre-gate tensor in
every routed branch). A stage or block boundary (``"layer2"``) does.

**Checkpoints.** A converted network is rebuilt from code, not pickled: give
training a factory (``model.name: "package.module:factory"``) that builds the
same network and calls ``make_dynamic`` each time; the checkpoint records the
factory's name and arguments, and the weights. ``create_model(...,
checkpoint_path=...)`` also accepts the *original* network's state dict
(``load_source_state_dict``), converted (and importance-ordered) the same way.
"""

from __future__ import annotations

import copy
import inspect
import operator
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from dsnet.layers.channel_groups import ChannelGraph, ChannelGroup, Unsliceable, analyse, trace
from dsnet.layers.channel_order import Importance, group_permutations, permute_channels
from dsnet.layers.gate import DynamicGate, make_divisible
from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear, conv_bn
from dsnet.models.base import DynamicNet

__all__ = ["FxDynamicNet", "make_dynamic"]


def _distinct_widths(size: int, ratios: Sequence[float]) -> list[int] | None:
    """Widths at ``ratios`` of ``size``: multiples of 8 if that keeps them distinct, else of 4, 2, 1."""
    for divisor in (8, 4, 2, 1):
        widths = [size if r >= 1.0 else min(size, make_divisible(size * r, divisor)) for r in ratios]
        if len(set(widths)) == len(widths):
            return widths
    return None


def _stages(
    cg: ChannelGraph, pre_ratio: float, ratios: list[float], unsliced: list[Unsliceable], gate_after: str
) -> tuple[list[str], list[tuple[int, ...]], dict[int, int], int]:
    """The sub-network table: one stage per group that slices, pre-gate groups first.

    Returns stage names, width choices, group id -> stage index, and the
    number of pre-gate stages. Groups after the gate too narrow for distinct
    widths keep their full width (appended to ``unsliced``).
    """
    groups = cg.groups
    pre_ids = [g for g in groups if groups[g].pre_gate and groups[g].fixed is None]
    post_ids = [g for g in groups if not groups[g].pre_gate and groups[g].fixed is None]
    widths: dict[int, tuple[int, ...]] = {}
    for gid in pre_ids:
        ws = _distinct_widths(groups[gid].size, [pre_ratio, 1.0]) if pre_ratio < 1 else None
        widths[gid] = tuple(ws) if ws else (groups[gid].size,)
    for gid in post_ids:
        ws = _distinct_widths(groups[gid].size, ratios)
        if ws is None:
            groups[gid].fixed = f"{groups[gid].size} channels cannot give {len(ratios)} distinct widths"
            unsliced.append(Unsliceable(groups[gid].name, groups[gid].fixed))
        else:
            widths[gid] = tuple(ws)
    post_ids = [g for g in post_ids if groups[g].fixed is None]
    if not post_ids:
        reasons = "; ".join(str(u) for u in unsliced) or "every group after it is the output"
        raise ValueError(f"gate_after={gate_after!r}: nothing after the gate can slice ({reasons})")
    if not pre_ids:  # the sub-network table needs a stage before the gate: the input channels
        first = next(g for g in groups.values() if g.name == "input")
        pre_ids, widths[first.id] = [first.id], (first.size,)
    names: list[str] = []
    stage_of: dict[int, int] = {}
    for gid in pre_ids + post_ids:
        stage_of[gid] = len(names)
        name, n = groups[gid].name, 1
        while name in names:  # parts of a split group share their layer's name
            n += 1
            name = f"{groups[gid].name}#{n}"
        names.append(name)
    return names, [widths[g] for g in pre_ids + post_ids], stage_of, len(pre_ids)


def _module_and_attr_nodes(graph: fx.Graph) -> Iterator[tuple[fx.Node, str]]:
    """Each ``call_module`` / ``get_attr`` node of ``graph`` whose target comes first, with its target's name."""
    seen: set[str] = set()
    for node in graph.nodes:
        name = str(node.target)
        if node.op in ("call_module", "get_attr") and name not in seen:
            seen.add(name)
            yield node, name


def _set_module(root: nn.Module, qualname: str, value: nn.Module | Tensor) -> None:
    """Install ``value`` at ``qualname`` under ``root``, creating empty containers on the way."""
    *path, field = qualname.split(".")
    node = root
    for item in path:
        nxt = getattr(node, item, None)
        if nxt is None:
            nxt = nn.Module()
            setattr(node, item, nxt)
        node = nxt
    if isinstance(value, nn.Parameter) or isinstance(value, nn.Module):
        setattr(node, field, value)
    else:
        node.register_buffer(field, value)


def _sliced(module: nn.Module, kind: str, num_slots: int) -> nn.Module:
    """The sliced counterpart of a plain layer, holding the same weights (BN statistics in every slot)."""
    with torch.no_grad():
        if kind in ("conv", "depthwise"):
            m = module
            conv = SlicedConv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size[0],
                m.stride[0],
                m.padding[0],
                m.dilation[0],
                depthwise=kind == "depthwise",
                bias=m.bias is not None,
            )
            conv.weight.copy_(m.weight)
            if m.bias is not None:
                conv.bias.copy_(m.bias)
            return conv.to(m.weight.device, m.weight.dtype)
        if kind == "bn":
            bn = SlicedBatchNorm2d(module.num_features, num_slots, module.eps, module.momentum)
            bn.weight.copy_(module.weight)
            bn.bias.copy_(module.bias)
            bn.running_mean.copy_(module.running_mean.expand_as(bn.running_mean))
            bn.running_var.copy_(module.running_var.expand_as(bn.running_var))
            bn.num_batches_tracked.fill_(int(module.num_batches_tracked))
            return bn.to(module.weight.device, module.weight.dtype)
        if kind == "linear":
            lin = SlicedLinear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight.copy_(module.weight)
            if module.bias is not None:
                lin.bias.copy_(module.bias)
            return lin.to(module.weight.device, module.weight.dtype)
    raise ValueError(f"no sliced layer for kind {kind!r}")


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


class FxDynamicNet(DynamicNet):
    """A plain CNN made dynamic by :func:`make_dynamic` (see the module docstring).

    Attributes beyond :class:`DynamicNet`: ``net`` (the network's layers,
    under their original names, sliced where they slice), ``gate``,
    ``groups`` (the channel groups, with their widths) and ``unsliced`` (what
    keeps full width, and why).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        gate_after: str,
        width_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        *,
        pre_gate_ratio: float | None = None,
        importance: Importance = "l1",
        routing_space: Sequence[int] | None = None,
        gate_se_ratio: float = 0.25,
        strict: bool = False,
        gate_mode: str | None = None,
        **routing_options: Any,
    ) -> None:
        ratios = sorted(float(r) for r in width_ratios)
        if not ratios or len(set(ratios)) != len(ratios) or not 0 < ratios[0] or ratios[-1] != 1.0:
            raise ValueError(
                f"width_ratios must be distinct values in (0, 1] ending with 1.0 (the original network), "
                f"got {list(width_ratios)}"
            )
        pre_ratio = ratios[0] if pre_gate_ratio is None else float(pre_gate_ratio)
        if not 0 < pre_ratio <= 1:
            raise ValueError(f"pre_gate_ratio must be in (0, 1], got {pre_gate_ratio}")
        if not isinstance(example_input, Tensor) or example_input.dim() != 4:
            raise ValueError("example_input must be a (N, C, H, W) image batch")
        _check_routing_options(routing_options)
        source = copy.deepcopy(model)
        gm, gate_node = trace(source, example_input, gate_after)
        cg = analyse(gm)
        self._check_output(gm)
        pre_nodes = self._check_cut(gm, gate_node, gate_after)
        gate_shape = tuple(gate_node.meta["tensor_meta"].shape)
        if len(gate_shape) != 4:
            raise ValueError(f"gate_after={gate_after!r} returns shape {gate_shape}; the gate needs a (N, C, H, W) map")
        pre_names = {n.name for n in pre_nodes}
        pre_groups = {g for name, c in cg.chan.items() if name in pre_names for g in c.spec}
        for gid, group in cg.groups.items():
            group.pre_gate = gid in pre_groups

        unsliced = list(cg.issues)
        stage_names, stage_widths, self._stage_of, num_pre = _stages(cg, pre_ratio, ratios, unsliced, gate_after)
        in_chans = example_input.shape[1]
        num_classes = gm.graph.find_nodes(op="output")[0].args[0].meta["tensor_meta"].shape[1]
        super().__init__(
            stage_names,
            stage_widths,
            num_pre,
            in_chans,
            num_classes,
            tuple(example_input.shape[1:]),
            routing_space,
            **routing_options,
        )
        if unsliced:
            text = "; ".join(str(u) for u in unsliced)
            if strict:
                raise ValueError(f"make_dynamic(strict=True): these layers cannot slice: {text}")
            warnings.warn(f"make_dynamic: kept at full width: {text}", stacklevel=3)
        self.unsliced: list[Unsliceable] = unsliced
        self.groups: dict[int, ChannelGroup] = cg.groups
        self.gate_after = gate_after
        self.width_ratios = ratios
        self.importance = importance
        self._graph = _detached_copy(gm.graph)  # the plan, without the original modules it was traced on
        self._chan = cg.chan
        self._kind = cg.module_kind
        self._pre_nodes = pre_names
        self._gate_node = gate_node.name
        self._uses = list({(u.module, u.role): u for g in cg.groups.values() for u in g.uses}.values())
        self._programs: dict[tuple[str, int], fx.GraphModule] = {}

        # the layers, under their original names, sliced where they slice
        self.net = nn.Module()
        self._source_keys: set[str] = set(source.state_dict())
        # the user's own module tree, without weights (meta device, unregistered): extract_source's skeleton
        self.__dict__["_skeleton"] = copy.deepcopy(model).to("meta")
        for node, name in _module_and_attr_nodes(gm.graph):
            if node.op == "call_module":
                module = gm.get_submodule(name)
                kind = self._kind.get(name, "other")
                _set_module(self.net, name, module if kind == "other" else _sliced(module, kind, self.num_slots))
            else:
                _set_module(self.net, name, _get_attr(gm, name))
        self.gate = DynamicGate(gate_shape[1], len(self.routing_space), gate_se_ratio)
        self.gate.init_identity_attention()
        self.set_gate_mode(gate_mode)  # the routing head every family offers: "pre" or "exit"
        self.gate.to(next(iter(self.net.parameters()), example_input).device)
        if self.exit_head is not None:
            self.exit_head.to(next(iter(self.net.parameters()), example_input).device)
        self._arrange(importance)
        self.train(model.training)  # new sliced layers and kept ones in the source's mode

    # ------------------------------------------------------------ conversion
    @staticmethod
    def _check_output(gm: fx.GraphModule) -> None:
        out = gm.graph.find_nodes(op="output")[0].args[0]
        shape = out.meta.get("tensor_meta") if isinstance(out, fx.Node) else None
        if shape is None or not hasattr(shape, "shape") or len(shape.shape) != 2:
            raise ValueError("make_dynamic needs a network that returns one (N, num_classes) tensor of logits")

    @staticmethod
    def _check_cut(gm: fx.GraphModule, gate_node: fx.Node, gate_after: str) -> set[fx.Node]:
        """The nodes before the gate; error if anything after the gate reads one of them besides the gate's input."""
        pre = _ancestors(gate_node)
        for node in gm.graph.nodes:
            if node in pre or node.op == "output":
                continue
            for a in node.all_input_nodes:
                if a in pre and a is not gate_node and a.op != "get_attr":
                    raise ValueError(
                        f"gate_after={gate_after!r} does not cut the network in two: {node.name!r} after the gate "
                        f"also reads {a.name!r} from before it; name a module whose output is the only way on "
                        "(e.g. a whole stage)"
                    )
        return pre

    def _width(self, gid: int, subnet: int) -> int:
        stage = self._stage_of.get(gid)
        return self.groups[gid].size if stage is None else self.subnets[subnet].widths[stage]

    def _spec_width(self, spec: tuple[int, ...], subnet: int) -> int:
        return sum(self._width(g, subnet) for g in spec)

    def _levels(self, spec: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Distinct per-part widths of a composite layout over the sub-networks, narrowest first."""
        levels: list[tuple[int, ...]] = []
        for k in range(len(self.subnets)):
            level = tuple(self._width(g, k) for g in spec)
            if not levels or level != levels[-1]:
                levels.append(level)
        return levels

    def _layout(self, spec: tuple[int, ...]) -> Tensor | None:
        """Channel order of a composite layout that makes every sub-network's channels a prefix (None: as is)."""
        if len(spec) < 2:
            return None
        sizes = [self.groups[g].size for g in spec]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        order, prev = [], [0] * len(spec)
        for level in self._levels(spec):
            for i, w in enumerate(level):
                order.extend(range(offsets[i] + prev[i], offsets[i] + w))
            prev = list(level)
        index = torch.tensor(order, dtype=torch.long)
        return None if torch.equal(index, torch.arange(len(index))) else index

    def _arrange(self, importance: Importance) -> int:
        """Importance-order every group that slices, then lay composite dimensions out by width level.

        Returns the number of groups reordered."""
        perms = group_permutations(self.groups, self.net, importance)
        sizes = {gid: g.size for gid, g in self.groups.items()}
        permute_channels(self.net, self._uses, sizes, perms, self._layout)
        self._programs.clear()
        return len(perms)

    def load_source_state_dict(self, state: dict[str, Tensor], importance: Importance | str = "same") -> int:
        """Load the *original* network's weights (its own state-dict keys), then order them as ``make_dynamic`` did.

        ``importance="same"`` uses the ranking given to ``make_dynamic``. Returns the number of groups reordered.
        """
        own = self.net.state_dict()
        missing = [k for k in own if k not in state and k in self._source_keys]
        unexpected = [k for k in state if k not in own and k not in self._source_keys]
        if missing or unexpected:
            raise ValueError(_key_mismatch("the original network's state dict", missing, unexpected))
        with torch.no_grad():
            for key, target in own.items():
                value = state[key]
                if value.shape == target.shape:
                    target.copy_(value)
                elif target.dim() == value.dim() + 1 and target.shape[1:] == value.shape:  # BN statistics slots
                    target.copy_(value.expand_as(target))
                else:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} in the state dict, {tuple(target.shape)} here")
        return self._arrange(self.importance if importance == "same" else importance)

    # --------------------------------------------------------------- programs
    def _slot(self, subnet: int, pre: bool) -> int:
        slots = self.slots(subnet)
        return slots[self.gate_stage - 1] if pre else slots[-1]

    def _program(self, part: str, subnet: int) -> fx.GraphModule:
        key = (part, subnet)
        if key not in self._programs:
            self._programs[key] = self._build_program(part, subnet)
        return self._programs[key]

    def _emit_cat(self, graph: fx.Graph, node: fx.Node, env: dict[str, fx.Node], subnet: int) -> fx.Node:
        """``torch.cat`` of sliced parts in the interleaved layout (a plain cat when that is the same)."""
        parts = [env[p.name] for p in node.args[0]]
        spec = self._chan[node.name].spec
        part_specs, i = [], 0
        for p in node.args[0]:
            n = len(self._chan[p.name].spec)
            part_specs.append(spec[i : i + n])
            i += n
        if self._layout(spec) is None:
            return graph.call_function(torch.cat, (parts, 1))
        # widths of each part per level, up to this sub-network's level
        part_levels = []
        for k in range(len(self.subnets)):
            level = tuple(self._spec_width(s, k) for s in part_specs)
            if not part_levels or level != part_levels[-1]:
                part_levels.append(level)
        mine = tuple(self._spec_width(s, subnet) for s in part_specs)
        chunks, prev = [], [0] * len(parts)
        for level in part_levels[: part_levels.index(mine) + 1]:
            for j, w in enumerate(level):
                if w > prev[j]:
                    chunks.append(graph.call_function(operator.getitem, (parts[j], (slice(None), slice(prev[j], w)))))
            prev = list(level)
        return graph.call_function(torch.cat, (chunks, 1))

    def _build_program(self, part: str, subnet: int, static_root: nn.Module | None = None) -> fx.GraphModule:
        """The graph of ``part`` (``pre``: input -> gate input; ``post``: gate output -> logits; ``static``: both,
        with the gate's attention as a module; ``static_pre`` / ``static_post``: one side of ``static``) with
        sub-network ``subnet``'s widths and slots written in."""
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        static = part.startswith("static")
        whole = part == "static"  # static_pre / static_post: the plain layers on one side of the gate
        part = {"static_pre": "pre", "static_post": "post"}.get(part, part)
        for node in self._graph.nodes:
            before = node.name in self._pre_nodes
            if node.op == "placeholder":
                if part != "post":
                    env[node.name] = graph.placeholder(node.name)
                continue
            if node.op == "get_attr":  # constants may be read on both sides of the gate
                env[node.name] = graph.node_copy(node)
                continue
            if part == "pre" and not before or part == "post" and before and node.name != self._gate_node:
                continue
            if part == "post" and node.name == self._gate_node:
                env[node.name] = graph.placeholder("h")
                continue
            if part == "pre" and node.op == "output":
                continue
            if node.op == "call_module" and not static:
                env[node.name] = self._emit_module(graph, node, env, subnet, before)
            elif node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate):
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                shape = node.meta["tensor_meta"].shape
                if dim % len(shape) == 1 and node.name in self._chan:
                    env[node.name] = self._emit_cat(graph, node, env, subnet)
                else:
                    env[node.name] = graph.node_copy(node, lambda n: env[n.name])
            else:
                env[node.name] = graph.node_copy(node, lambda n: env[n.name])
            if whole and node.name == self._gate_node:
                env[node.name] = graph.call_module(self._static_gate_name, (env[node.name],))
        if part == "pre":
            graph.output(env[self._gate_node])
        graph.lint()
        return fx.GraphModule(static_root if static else self.net, graph, f"{type(self).__name__}_{part}{subnet}")

    def _emit_module(self, graph: fx.Graph, node: fx.Node, env: dict[str, fx.Node], subnet: int, pre: bool) -> fx.Node:
        name = str(node.target)
        kind = self._kind.get(name, "other")
        x = env[node.args[0].name]
        bn = self._bn_reading(node) if kind in ("conv", "depthwise") else None
        if bn is not None:  # conv + the BatchNorm that alone reads it: one call, folded at inference (conv_bn)
            width = self._spec_width(self._chan[node.name].spec, subnet) if kind == "conv" else None
            slot = self._slot(subnet, bn.name in self._pre_nodes)
            return graph.call_function(conv_bn, (graph.get_attr(name), graph.get_attr(str(bn.target)), x, slot, width))
        if kind == "bn" and self._bn_reading(node.args[0]) is node:
            return x  # folded into the convolution before it
        if kind in ("conv", "linear"):
            return graph.call_module(name, (x, self._spec_width(self._chan[node.name].spec, subnet)))
        if kind == "bn":
            return graph.call_module(name, (x, self._slot(subnet, pre)))
        if kind == "depthwise":
            return graph.call_module(name, (x,))
        return graph.node_copy(node, lambda n: env[n.name])

    def _bn_reading(self, node: fx.Node) -> fx.Node | None:
        """The BatchNorm node that is the only reader of convolution node ``node`` (on its side of the gate)."""
        if node.op != "call_module" or self._kind.get(str(node.target)) not in ("conv", "depthwise"):
            return None
        if node.name == self._gate_node or len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if user.op != "call_module" or self._kind.get(str(user.target)) != "bn" or user.args[0] is not node:
            return None
        return user if (user.name in self._pre_nodes) == (node.name in self._pre_nodes) else None

    # ------------------------------------------------------- DynamicNet API
    def forward_pre(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        return self.forward_gate(self._program("pre", subnet)(x), subnet)

    def forward_post(self, h: Tensor, subnet: int) -> Tensor:
        return self._program("post", subnet)(h)

    def build_static(self, subnet: int) -> nn.Module:
        """A plain ``torch.fx.GraphModule``: ``nn.Conv2d``/``BatchNorm2d``/``Linear`` copies at ``subnet``'s widths."""
        return self._build_program("static", subnet, self._static_root(subnet, with_gate=True))

    def build_static_trunk(self, subnet: int) -> nn.Module:
        return self._build_program("static_pre", subnet, self._static_root(subnet, with_gate=False))

    def build_static_post(self, subnet: int) -> nn.Module:
        return self._build_program("static_post", subnet, self._static_root(subnet, with_gate=False))

    def _static_root(self, subnet: int, with_gate: bool) -> nn.Module:
        """The modules and constants of :meth:`build_static`'s graph at ``subnet``'s widths (the gate's attention too
        with ``with_gate``)."""
        root = nn.Module()
        names = {n for n, _ in self.net.named_modules()}
        self._static_gate_name = next(n for n in ("gate", "dsnet_gate", "dsnet_gate_") if n not in names)
        for node in self._graph.nodes:
            if node.op == "call_module":
                name = str(node.target)
                module = self.net.get_submodule(name)
                _set_module(root, name, self._static_layer(node, module, subnet))
            elif node.op == "get_attr":
                value = _get_attr(self.net, str(node.target))
                value = nn.Parameter(value.detach().clone()) if isinstance(value, nn.Parameter) else value.clone()
                _set_module(root, str(node.target), value)
        if with_gate:
            gate_width = self._spec_width(self._chan[self._gate_node].spec, subnet)
            setattr(root, self._static_gate_name, self.gate.to_static(gate_width))
        return root

    def _static_layer(self, node: fx.Node, module: nn.Module, subnet: int) -> nn.Module:
        kind = self._kind.get(str(node.target), "other")
        pre = node.name in self._pre_nodes
        if kind == "other":
            return copy.deepcopy(module)
        in_chan = self._chan[node.args[0].name]
        in_width = self._spec_width(in_chan.spec, subnet)
        if kind == "depthwise":
            return module.to_static(in_width)
        if kind == "bn":
            return module.to_static(in_width, self._slot(subnet, pre))
        out_width = self._spec_width(self._chan[node.name].spec, subnet)
        if kind == "linear":
            return module.to_static(in_width * in_chan.inner, out_width)
        return module.to_static(in_width, out_width)

    def extract_source(self, subnet: int) -> nn.Module:
        """Sub-network ``subnet`` as the user's own network: their module classes, narrower layers, no dsnet code.

        A deep copy of the network given to ``make_dynamic`` in which every ``Conv2d``, ``BatchNorm2d`` and
        ``Linear`` is a plain layer of this sub-network's width holding its (sliced, importance-ordered)
        weights and statistics, and every other module holds the trained copy. So the user's class built at
        these widths loads its ``state_dict()``. It runs the user's own ``forward``.

        Possible only when that forward computes the sub-network: the gate's attention (inserted by dsnet,
        input-dependent, so it cannot be folded into a layer) must still be the identity, as ``make_dynamic``
        starts it, and the forward must not depend on channel counts or on the channel order of
        concatenations that both slice. Both are checked (on random images, against :meth:`extract`); if
        either fails, a ``ValueError`` says why and :meth:`extract` (a ``torch.fx.GraphModule``) is the way.
        """
        k = self.check_subnet(subnet)
        graph_version = self.extract(k, fold_bn=False).eval()
        gate_width = self._spec_width(self._chan[self._gate_node].spec, k)
        g = torch.Generator().manual_seed(0)
        ref = next(iter(self.net.parameters()))
        x = torch.randn(2, *self.default_input_size, generator=g).to(ref.device, ref.dtype)
        with torch.no_grad():
            h = self._program("pre", k)(x)
            attention = self.gate.to_static(gate_width).eval()
            if not torch.equal(attention(h), h):
                raise ValueError(
                    "extract_source: the gate's attention is no longer the identity (it was trained), and the "
                    "user's network has no place for it; use extract(), which keeps it as a module"
                )
        out = copy.deepcopy(self._skeleton)
        for node, name in _module_and_attr_nodes(self._graph):
            if node.op == "call_module":
                layer = self._static_layer(node, self.net.get_submodule(name), k)
                _set_module(out, name, layer)
            else:
                value = _get_attr(self.net, name)
                value = nn.Parameter(value.detach().clone()) if isinstance(value, nn.Parameter) else value.clone()
                _set_module(out, name, value)
        meta = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
        if meta:
            raise ValueError(f"extract_source: tensors the traced forward never reads: {', '.join(meta[:5])}")
        out = out.to(ref.device).eval()
        try:
            with torch.no_grad():
                same = torch.allclose(out(x), graph_version(x), rtol=1e-4, atol=1e-5)
        except (RuntimeError, ValueError, IndexError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"extract_source: the network's own forward fails at these widths ({first})") from None
        if not same:
            raise ValueError(
                "extract_source: the network's own forward does not compute sub-network "
                f"{k} (it depends on channel counts or on the order of concatenated channels); use extract()"
            )
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate_after={self.gate_after!r}, unsliced={len(self.unsliced)}"


def _check_routing_options(options: dict[str, Any]) -> None:
    """Options for the :class:`DynamicNet` base constructor: a one-line error for any it does not take."""
    own = {"self", "stage_names", "stage_widths", "gate_stage", "in_chans", "num_classes", "input_size"}
    accepted = [p for p in inspect.signature(DynamicNet.__init__).parameters if p not in own]
    unknown = sorted(set(options) - set(accepted) - {"routing_space"})
    if unknown:
        raise ValueError(
            f"make_dynamic: unknown option(s) {', '.join(unknown)}; routing options the DynamicNet base takes: "
            f"{', '.join(p for p in accepted if p != 'routing_space') or 'none'} (and gate_mode, routing_space)"
        )


def _detached_copy(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (same node names and shapes) that keeps no reference to the traced module."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    for old, copied in env.items():
        if old.name != copied.name:
            raise RuntimeError(f"graph copy renamed {old.name!r} to {copied.name!r}")
    return new


def _get_attr(root: nn.Module, qualname: str) -> Tensor:
    *path, field = qualname.split(".")
    module = root.get_submodule(".".join(path)) if path else root
    return getattr(module, field)


def _key_mismatch(what: str, missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        more = " ..." if len(unexpected) > 5 else ""
        parts.append(f"unexpected {', '.join(unexpected[:5])}{more} ({len(unexpected)} in all)")
    return f"{what} does not fit: {'; '.join(parts)}"


def make_dynamic(
    model: nn.Module,
    example_input: Tensor,
    gate_after: str,
    width_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    *,
    pre_gate_ratio: float | None = None,
    importance: Importance = "l1",
    routing_space: Sequence[int] | None = None,
    gate_se_ratio: float = 0.25,
    strict: bool = False,
    gate_mode: str | None = None,
    **routing_options: Any,
) -> FxDynamicNet:
    """Make a plain PyTorch CNN dynamic: sliced layers, a gate after ``gate_after``, one sub-network per ratio.

    Args:
        model: a ``torch.nn`` classifier traceable by torch.fx, returning ``(N, num_classes)`` logits.
            It is not modified (the result holds copies of its weights).
        example_input: a ``(N, C, H, W)`` batch; fixes the input channels and the default input size.
        gate_after: qualified name of the module after which the gate decides (e.g. ``"layer2"``).
        width_ratios: the routed widths, as fractions of each channel group (must end with 1.0).
        pre_gate_ratio: width of the groups before the gate in routed sub-networks (default: the slimmest ratio).
        importance: channel ranking applied before slicing: ``"l1"``, ``None`` (keep the order), or a
            callable ``(group, root) -> scores`` (see :mod:`dsnet.layers.channel_order`).
        routing_space: sub-networks the gate picks among (default: the first four).
        gate_se_ratio: width of the gate's shared encoder as a fraction of its input channels.
        strict: raise instead of warning when some layers cannot slice.
        gate_mode: the routing head, as for dsnet's own models: ``"exit"`` (the slimmest sub-network runs
            first and an early-exit head decides; the default with two or more choices) or ``"pre"`` (the paper's); see
            :meth:`DynamicNet.set_gate_mode`. ``gate.mode`` in a training config
            reaches it through the factory, so a factory should accept and forward these (``def
            factory(num_classes, in_chans, **options): return make_dynamic(..., **options)``).
        **routing_options: any other routing option of the :class:`DynamicNet` base constructor, passed on as is.

    Returns a :class:`FxDynamicNet`; ``unsliced`` lists what keeps full width and why.
    """
    return FxDynamicNet(
        model,
        example_input,
        gate_after,
        width_ratios,
        pre_gate_ratio=pre_gate_ratio,
        importance=importance,
        routing_space=routing_space,
        gate_se_ratio=gate_se_ratio,
        strict=strict,
        gate_mode=gate_mode,
        **routing_options,
    )
