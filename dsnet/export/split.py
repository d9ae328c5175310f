"""The dynamic model as plain modules: the shared pre-gate part with the gate, and one network per routing choice.

Dynamic inference runs the pre-gate part once for the batch, takes the gate's
decision per sample and runs each routed sub-network's post-gate part on the
samples that chose it (``DynamicNet.route``). :func:`split_dynamic` builds that
split as plain ``torch.fx`` graph modules of ATen operations, the same split (the
same :class:`PreGate` and :class:`PostGate`) the ONNX bundle exports
(``dsnet.export.onnx``):

* ``pre``: ``images -> (features, gate_logits)`` (and, in ``"exit"`` gate mode,
  the slimmest's logits: routing choice 0's answer), ``gate_logits`` being the
  model's own :meth:`~dsnet.models.base.DynamicNet.gate_logits` (scores of its
  router, stored budget bias included);
* ``post[j]``: ``features -> logits`` of routing choice ``j`` (``None`` for
  choice 0 in ``"exit"`` mode).

Each part is traced with ``torch.export`` from a compact copy of the model
(``compact_copy``: only the weight prefixes that part uses) with a dynamic batch
dimension, then every BatchNorm that follows a convolution is folded into it
and every computation on weights alone (prefix slices, casts) is done once:
what is left is the network's own convolutions, matmuls and activations on
compact, folded weights held as buffers. No sliced layer, no cache, no Python
model code runs per call, and the modules can be given to ``torch.compile``
as they are.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from dsnet.export.compact import compact_copy
from dsnet.layers.sliced import fold_batchnorm
from dsnet.models.base import DynamicNet

__all__ = ["PreGate", "PostGate", "SplitModules", "split_dynamic", "plain_graph"]

_BATCH_NORMS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)
_CONVS = (torch.ops.aten.conv2d.default,)
# ops that only check shapes at run time (export's range assertions): dropped from serving graphs
# export's guards, dropped from the serving graphs; the dtype assertion (from a ``.float()`` in the graph, e.g. the
# exit head's softmax) would otherwise refuse the graph once its weights are cast (SplitServing(dtype=bfloat16))
_CHECKS = (
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_tensor_metadata.default,
)


class PreGate(nn.Module):
    """Shared part of dynamic inference: features for the routed part and the gate's scores (budget bias included).

    In ``"exit"`` gate mode the slimmest's logits come third (the gate reads them; they are choice 0's answer).
    """

    def __init__(self, model: DynamicNet) -> None:
        super().__init__()
        self.model = model
        self.subnet = model.routing_space[0]  # every routed sub-network shares the pre-gate widths

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        h, z = self.model.forward_pre(x, self.subnet)
        logits, slim_out = self.model.gate_logits(h, z)
        return (h, logits) if slim_out is None else (h, logits, slim_out)


class PostGate(nn.Module):
    """The routed part of sub-network ``subnet``: pre-gate features -> logits."""

    def __init__(self, model: DynamicNet, subnet: int) -> None:
        super().__init__()
        self.model = model
        self.subnet = subnet

    def forward(self, h: Tensor) -> Tensor:
        return self.model.forward_post(h, self.subnet)


class SplitModules(nn.Module):
    """``pre`` and ``post`` (one per routing choice; ``None`` where ``pre`` already returns the answer)."""

    def __init__(self, pre: nn.Module, post: Sequence[nn.Module | None], routing_space: Sequence[int]) -> None:
        super().__init__()
        self.pre = pre
        self.post = nn.ModuleList([nn.Identity() if p is None else p for p in post])
        self.exit_choice0 = post[0] is None
        self.routing_space = list(routing_space)

    def posts(self) -> list[nn.Module | None]:
        return [None if j == 0 and self.exit_choice0 else p for j, p in enumerate(self.post)]


def _fetch(root: nn.Module, target: str) -> Tensor:
    obj: object = root
    for name in target.split("."):
        obj = getattr(obj, name)
    if not isinstance(obj, Tensor):
        raise TypeError(f"{target} is not a tensor")
    return obj


def _tensors_in(args: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)  # type: ignore[arg-type]
    return found


def _fold(gm: fx.GraphModule, single_output: bool) -> fx.GraphModule:
    """Constant-fold weight-only computations, fold conv -> BatchNorm pairs; a new plain graph module."""
    graph = gm.graph
    env: dict[fx.Node, object] = {}  # nodes whose value depends on no input: computed once here
    for node in graph.nodes:
        if node.op == "get_attr":
            env[node] = _fetch(gm, str(node.target))
        elif node.op == "call_function" and node.target not in _CHECKS:
            inputs = _tensors_in((node.args, node.kwargs))
            if inputs and all(n in env for n in inputs) and isinstance(node.target, torch._ops.OpOverload):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])  # type: ignore[misc]
                with torch.no_grad():
                    env[node] = node.target(*args, **kwargs)
    with torch.no_grad():
        for bn in list(graph.nodes):
            if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
                continue
            legit = bn.target is torch.ops.aten._native_batch_norm_legit_no_training.default
            conv = bn.args[0]
            if legit:
                weight, bias, mean, var, _momentum, eps = bn.args[1:7]
            else:
                weight, bias, mean, var, training, _momentum, eps = bn.args[1:8]
                if training:
                    continue
            if not (isinstance(conv, fx.Node) and conv.target in _CONVS and len(conv.users) == 1):
                continue
            conv_w, conv_b = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
            needed = [t for t in (conv_w, conv_b, weight, bias, mean, var) if t is not None]
            if not all(isinstance(t, fx.Node) and t in env for t in needed):
                continue

            def value(t: fx.Node | None) -> Tensor | None:
                return None if t is None else env[t]  # type: ignore[return-value]

            w, b = fold_batchnorm(
                value(conv_w), value(conv_b), value(mean), value(var), value(weight), value(bias), float(eps)
            )  # type: ignore[arg-type]
            with graph.inserting_before(conv):
                w_node = graph.call_function(torch.ops.aten.clone.default, (conv_w,))  # placeholders, valued below
                b_node = graph.call_function(torch.ops.aten.clone.default, (conv_w,))
            env[w_node], env[b_node] = w, b
            conv.args = (conv.args[0], w_node, b_node, *conv.args[3:])
            if legit:  # a tuple: output 0 is the normalised tensor, the others are empty saved statistics
                for user in list(bn.users):
                    if user.target is operator.getitem and user.args[1] == 0:
                        user.replace_all_uses_with(conv)
                        graph.erase_node(user)
            else:
                bn.replace_all_uses_with(conv)
            if not bn.users:
                graph.erase_node(bn)
    # a new graph of the run-time ops alone: every constant one of them reads becomes a buffer of the new module
    root = nn.Module()
    new_graph = fx.Graph()
    new_graph._codegen = fx.graph.CodeGen()  # plain positional inputs and outputs, no pytree
    mapped: dict[fx.Node, fx.Node] = {}

    def lookup(node: fx.Node) -> fx.Node:
        if node not in mapped:  # a constant (weights, folded weights, their slices)
            name = f"const_{len(root._buffers)}"
            root.register_buffer(name, env[node].detach().clone().contiguous())  # type: ignore[union-attr]
            mapped[node] = new_graph.get_attr(name)
        return mapped[node]

    for node in graph.nodes:
        if node in env or node.op == "call_module" or (node.op == "call_function" and node.target in _CHECKS):
            continue  # constants (created on first use), export's input guard and range checks
        if node.op == "output":
            outputs = fx.node.map_arg(node.args[0], lookup)
            new_graph.output(outputs[0] if single_output else tuple(outputs))  # type: ignore[index, arg-type]
            break
        mapped[node] = new_graph.node_copy(node, lookup)
        mapped[node].meta = {}
    result = fx.GraphModule(root, new_graph, class_name="ServingGraph")
    result.graph.eliminate_dead_code()
    result.recompile()
    return result.eval()


def plain_graph(module: nn.Module, example: Tensor) -> fx.GraphModule:
    """``module`` traced with ``torch.export`` (dynamic batch), BatchNorms folded, weights computed once.

    The result is a ``torch.fx.GraphModule`` of ATen operations with compact weights as buffers; it takes the
    same positional tensor input and returns what ``module`` returns (a tensor or a tuple of tensors).
    """
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    module = module.eval()
    with torch.no_grad():
        single = isinstance(module(example), Tensor)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    return _fold(program.module(), single)  # type: ignore[arg-type]


def split_dynamic(model: DynamicNet, input_size: Sequence[int] | None = None) -> SplitModules:
    """The pre-gate part with the gate, and one post-gate network per routing choice, as plain folded graphs.

    ``model`` must be in eval mode (its BatchNorm statistics are folded in). Checks nothing itself: see
    :func:`dsnet.export.serving.check_serving` for outputs against eager dynamic inference.
    """
    if model.training:
        raise ValueError("split_dynamic needs the model in eval mode (model.eval())")
    ref = next(model.parameters())
    x = torch.randn(2, *(input_size or model.default_input_size), device=ref.device, dtype=ref.dtype)
    pre = plain_graph(PreGate(compact_copy(model, lambda m: PreGate(m)(x))), x)
    with torch.no_grad():
        h, _ = model.forward_pre(x, model.routing_space[0])
    posts: list[nn.Module | None] = []
    for j, k in enumerate(model.routing_space):
        if model.gate_mode == "exit" and j == 0:  # the pre-gate part already returns the slimmest's answer
            posts.append(None)
            continue
        posts.append(plain_graph(PostGate(compact_copy(model, lambda m, k=k: m.forward_post(h, k)), k), h))
    return SplitModules(pre, posts, model.routing_space)
