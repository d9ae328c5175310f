"""Serving a dynamic model: one object per runtime, the same routing and the same knob in all of them.

Four runtimes serve a trained :class:`~dsnet.models.base.DynamicNet` (its gate trained):

* ``"eager"``: the model itself, ``model(x, gate_bias=...)`` under ``torch.inference_mode``;
* ``"eager-split"``: the split of dynamic inference as plain graph modules (:func:`dsnet.export.split.split_dynamic`:
  the pre-gate part with the gate, one post-gate network per routing choice; compact BatchNorm-folded weights,
  no sliced layers, no caches), run eagerly;
* ``"compile"``: the same split, every part ``torch.compile``-d (``dynamic=True``: a network compiles for batch 1,
  2-15 and 16 and more, measured with torch 2.13, and never again whatever the group sizes; compiled at build time
  on warm-up batches, so serving never waits for the compiler);
* ``"onnx"``: the exported bundle in ONNX Runtime (:class:`dsnet.export.onnx.OnnxDynamicModel`).

Every one routes as the eager model does: ``choice = argmax(gate_logits + b * model.bias_direction())`` per image,
``gate_logits`` being the model's own :meth:`~dsnet.models.base.DynamicNet.gate_logits` (its router's scores, the
stored budget bias included), ``b`` the one knob (``bias``; 0: the gate as trained). Images are grouped by choice,
each group runs its network once, and the outputs are put back in input order. The knob's bias vector is built
once, on the model's device, when ``bias`` is set: a call copies nothing to the device but the images.

:func:`build_serving` builds one runtime; ``dsnet.serving_model`` (:func:`dsnet.bench.serving.serving_model`) is the
entry point: it also loads checkpoints, and picks the runtime (``"auto"``: :data:`AUTO_RUNTIME`, backed by
``benchmarks/results/serving_paths.json``; ``"measure"``: timed on the spot).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dsnet.export.split import plain_graph, split_dynamic
from dsnet.models.base import DynamicNet

__all__ = [
    "RUNTIMES",
    "AUTO_RUNTIME",
    "LATENCY_MAX_BATCH",
    "ServingOutput",
    "ServingModel",
    "EagerServing",
    "SplitServing",
    "OnnxServing",
    "auto_runtime",
    "build_serving",
    "check_serving",
]

RUNTIMES = ("eager", "eager-split", "compile", "onnx")

# The runtime ``runtime="auto"`` picks, per device type and batch-size regime ("latency": batches of at most
# LATENCY_MAX_BATCH images, "throughput": larger), then the next ones to fall back on where a runtime is not
# installed. Backed by benchmarks/results/serving_paths.json (benchmarks/serving_paths.py, the fastest dynamic
# model per batch size); a test checks the two agree. CUDA has no measurement yet: compile, then eager.
AUTO_RUNTIME: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {"latency": ("onnx", "eager-split", "eager"), "throughput": ("onnx", "compile", "eager-split", "eager")},
    "cuda": {"latency": ("compile", "eager-split", "eager"), "throughput": ("compile", "eager-split", "eager")},
}
LATENCY_MAX_BATCH = 8

DEFAULT_COMPILE = {"dynamic": True}
# inductor on CPU: freeze the (constant) weights, so convolution weights are pre-packed and folded once
DEFAULT_INDUCTOR_CPU_OPTIONS = {"freezing": True}
WARMUP_BATCHES = (1, 2, 16)  # one batch per graph torch.compile makes for a network (see the module docstring)


@dataclass
class ServingOutput:
    """Logits ``(N, classes)`` and the routing choice of every image ``(N,)``, an index into ``routing_space``."""

    logits: Tensor
    choice: Tensor


class ServingModel:
    """What every runtime gives: ``model(images) -> logits``, ``model.route(images)``, the knob ``bias``.

    ``images``: a float tensor ``(N, C, H, W)`` prepared as the model's data recipe says (a numpy array works
    too). ``bias`` (settable) is the knob ``b`` of ``argmax(gate_logits + b * bias_direction)``; 0 is the gate
    as trained, ``b > 0`` saves compute. ``routing_space`` and ``bias_direction`` are the model's.
    """

    runtime: str = ""

    def __init__(self, routing_space: Sequence[int], bias_direction: Tensor, bias: float = 0.0) -> None:
        self.routing_space = list(routing_space)
        self.bias_direction = torch.as_tensor(bias_direction, dtype=torch.float32).detach().cpu()
        self._bias = 0.0
        self.bias = bias

    @property
    def bias(self) -> float:
        return self._bias

    @bias.setter
    def bias(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"bias must be a finite number, got {value!r}")
        self._bias = float(value)
        self._set_gate_bias(None if value == 0 else self.bias_direction * float(value))

    def _set_gate_bias(self, vector: Tensor | None) -> None:
        raise NotImplementedError

    def route(self, images: Tensor | np.ndarray) -> ServingOutput:
        raise NotImplementedError

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        return self.route(images).logits

    def static_network(self, subnet: int) -> Callable[[Tensor], Any]:
        """Sub-network ``subnet`` alone, as a static network in this runtime (for comparisons)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.runtime


def _as_tensor(images: Tensor | np.ndarray) -> Tensor:
    return images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))


def _group_run(
    h: Tensor,
    choice: Tensor,
    num_choices: int,
    post: Callable[[Tensor, int, Tensor | None], Tensor],
) -> Tensor:
    """Run ``post(group, j, rows)`` on each group of samples that chose ``j``; outputs back in input order.

    One gather sorts the batch by choice (the groups are views of it); each group's output is copied straight
    to its rows of the result. A channels-last feature map is gathered as NHWC, so the groups stay
    channels-last. One image: one read of its choice, no grouping at all.
    """
    n = h.shape[0]
    if n == 1:
        return post(h, int(choice[0]), None)
    counts = torch.bincount(choice, minlength=num_choices).tolist()
    if max(counts) == n:  # the whole batch agrees: no gather/scatter
        return post(h, counts.index(n), None)
    order = torch.argsort(choice, stable=True)
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
        grouped = h.permute(0, 2, 3, 1).index_select(0, order).permute(0, 3, 1, 2)
    else:
        grouped = h.index_select(0, order)
    rows = order.split(counts)
    out: Tensor | None = None
    for j, part in enumerate(grouped.split(counts)):
        if part.shape[0] == 0:
            continue
        part_out = post(part, j, rows[j])
        if out is None:
            out = part_out.new_empty((n, *part_out.shape[1:]))
        out.index_copy_(0, rows[j], part_out)
    return out  # type: ignore[return-value]


class _TorchServing(ServingModel):
    """Shared by the torch runtimes: device, dtype, memory format of the input, the knob's vector on the device."""

    def __init__(
        self,
        model: DynamicNet,
        *,
        bias: float = 0.0,
        dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        input_size: Sequence[int] | None = None,
    ) -> None:
        ref = next(model.parameters())
        self.device = ref.device
        self.dtype = dtype or ref.dtype
        self.channels_last = self.device.type == "cpu" if channels_last is None else bool(channels_last)
        self.input_size = tuple(input_size or model.default_input_size)
        self._source = model
        self._gate_bias: Tensor | None = None
        super().__init__(model.routing_space, model.bias_direction(self.input_size), bias)

    def _set_gate_bias(self, vector: Tensor | None) -> None:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            self._gate_bias = None if vector is None else vector.to(self.device, torch.float32)

    def _prepare(self, images: Tensor | np.ndarray) -> Tensor:
        x = _as_tensor(images).to(self.device, self.dtype, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _static_module(self, subnet: int) -> nn.Module:
        static = self._source.extract(self._source.check_subnet(subnet), inplace=True).eval()
        return static.to(self.dtype)


class EagerServing(_TorchServing):
    """``"eager"``: the dynamic model itself (``model(x, gate_bias=...)``, inference mode)."""

    runtime = "eager"

    def __init__(self, model: DynamicNet, *, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        model = model.eval()
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model = copy.deepcopy(model).to(dtype)  # cast once, not per call (the caller's model is left as is)
        super().__init__(model, dtype=dtype, **kwargs)
        self.model = model

    def _set_gate_bias(self, vector: Tensor | None) -> None:
        # a tuple: the model converts and checks it once and keeps the device tensor (DynamicNet.route)
        self._gate_bias_values = None if vector is None else tuple(float(v) for v in vector)

    def route(self, images: Tensor | np.ndarray) -> ServingOutput:
        x = self._prepare(images)
        with torch.inference_mode():
            out = self.model(x, return_routing=True, gate_bias=self._gate_bias_values)
        return ServingOutput(out.logits, out.choice)

    def static_network(self, subnet: int) -> Callable[[Tensor], Any]:
        static = self._static_module(subnet)

        def run(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return static(x)

        return run


def _counting_backend(options: dict[str, Any], counter: list[int]) -> dict[str, Any]:
    """``torch.compile`` keyword arguments whose backend counts the graphs it compiles (``counter[0]``).

    The backend torch.compile would build from ``backend``/``mode``/``options`` is built the same way and
    wrapped; where this torch does not have those wrappers, the arguments come back unchanged (no count).
    """
    options = dict(options)
    backend = options.pop("backend", "inductor")
    mode, extra, dynamic = options.pop("mode", None), options.pop("options", None), options.get("dynamic")
    try:
        if backend == "inductor":
            inner = torch._TorchCompileInductorWrapper(mode, extra, dynamic)  # what torch.compile builds
        else:
            inner = torch._TorchCompileWrapper(backend, mode, extra, dynamic)
    except (AttributeError, TypeError):
        counter[0] = -1  # unknown
        return {"backend": backend, "mode": mode, "options": extra, **options}

    def count(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable:
        counter[0] += 1
        return inner(gm, example_inputs)

    return {"backend": count, **options}


class SplitServing(_TorchServing):
    """``"eager-split"`` / ``"compile"``: the split (:func:`~dsnet.export.split.split_dynamic`), eager or compiled.

    ``compile``: None runs the plain graphs eagerly; a dict is ``torch.compile``'s keyword arguments
    (``backend``, ``mode``, ``options``, ``dynamic``; default ``dynamic=True``, inductor with ``freezing`` on CPU).
    Compiled networks are warmed up at build time on batches of :data:`WARMUP_BATCHES` (``warmup``), so that
    every graph torch makes is compiled before the first call: ``compile_seconds`` is how long that took,
    ``compiled_graphs`` how many graphs were compiled (the count goes on if a later call recompiles).
    """

    def __init__(
        self,
        model: DynamicNet,
        *,
        compile: Mapping[str, Any] | None = None,  # noqa: A002 - torch.compile's keyword arguments
        warmup: Sequence[int] = WARMUP_BATCHES,
        **kwargs: Any,
    ) -> None:
        model = model.eval()
        super().__init__(model, **kwargs)
        if self.dtype != next(model.parameters()).dtype:
            # traced in the serving dtype: a traced graph fixes the dtype of every cast in it (the exit head
            # computes its features in float32, then casts back), so casting the fp32 graphs afterwards would not do
            model = copy.deepcopy(model).to(self.dtype)
        split = split_dynamic(model, self.input_size).to(self.dtype)
        self.split = split
        self.exit_mode = split.exit_choice0
        self.compile_options = None if compile is None else {**DEFAULT_COMPILE, **dict(compile)}
        self.runtime = "eager-split" if compile is None else "compile"
        self.compiled_graphs = [0]
        self.compile_seconds = 0.0
        self.pre: Callable = self._compiled(split.pre)
        self.post: list[Callable | None] = [None if p is None else self._compiled(p) for p in split.posts()]
        if self.compile_options is not None and warmup:
            self.compile_seconds = self._warmup(warmup)

    def _compiled(self, module: nn.Module) -> Callable:
        if self.compile_options is None:
            return module
        options = dict(self.compile_options)
        if options.get("backend", "inductor") == "inductor" and self.device.type == "cpu" and "mode" not in options:
            options["options"] = {**DEFAULT_INDUCTOR_CPU_OPTIONS, **(options.get("options") or {})}
        return torch.compile(module, **_counting_backend(options, self.compiled_graphs))

    def _warmup(self, batches: Sequence[int]) -> float:
        """Run every network once per warm-up batch size (each compiles its graphs); the seconds it took."""
        t0 = time.perf_counter()
        for n in batches:
            x = self._prepare(torch.randn(n, *self.input_size))
            with torch.inference_mode():
                h, *_ = self.pre(x)
                for post in self.post:
                    if post is not None:
                        post(h)
        return time.perf_counter() - t0

    def route(self, images: Tensor | np.ndarray) -> ServingOutput:
        x = self._prepare(images)
        with torch.inference_mode():
            h, logits, *slim = self.pre(x)
            if self._gate_bias is not None:
                logits = logits + self._gate_bias
            choice = logits.argmax(dim=1)
            slim_out = slim[0] if slim else None

            def post(part: Tensor, j: int, rows: Tensor | None) -> Tensor:
                if j == 0 and slim_out is not None:  # exit mode: the slimmest's answer is already computed
                    return slim_out if rows is None else slim_out.index_select(0, rows)
                return self.post[j](part)  # type: ignore[misc]

            out = _group_run(h, choice, len(self.post), post)
        return ServingOutput(out, choice)

    def static_network(self, subnet: int, warmup: Sequence[int] = WARMUP_BATCHES) -> Callable[[Tensor], Any]:
        """Sub-network ``subnet`` as one plain folded graph, compiled like the split (warmed up on ``warmup``)."""
        static = self._static_module(subnet)
        x = self._prepare(torch.randn(2, *self.input_size))
        network = self._compiled(plain_graph(static, x))
        if self.compile_options is not None:
            for n in warmup:
                with torch.inference_mode():
                    network(self._prepare(torch.randn(n, *self.input_size)))

        def run(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return network(x)

        return run

    def describe(self) -> str:
        if self.compile_options is None:
            return "eager-split (plain BN-folded graphs, eager)"
        opts = ", ".join(f"{k}={v}" for k, v in self.compile_options.items())
        return f"compile ({opts}; {self.compiled_graphs[0]} graphs in {self.compile_seconds:.1f} s)"


class OnnxServing(ServingModel):
    """``"onnx"``: the dynamic bundle in ONNX Runtime (CPU). Takes and returns what the torch runtimes do.

    Built from a model (exported into ``folder``, a temporary directory by default, kept while this object
    lives) or from an exported bundle (its manifest or pre-gate ``.onnx``). ``threads``: intra-op threads per
    session (default: torch's count). ``batch1_threads``: the intra-op threads of one-image calls
    (``OnnxDynamicModel``'s batch-1 path); ``"auto"`` (default) times 1 and ``threads`` on the spot when the
    bundle opens (``tune_batch1_threads``, ~0.1 s for a small network) and keeps the faster, recorded in
    ``batch1_tuning``; None: ``threads``. Each :meth:`static_network` gets the same treatment, measured on its own
    graph, so a comparison at batch 1 sets each side's fastest configuration against the other.
    """

    runtime = "onnx"

    def __init__(
        self,
        source: DynamicNet | str | os.PathLike,
        *,
        bias: float = 0.0,
        threads: int | None = None,
        folder: str | os.PathLike | None = None,
        input_size: Sequence[int] | None = None,
        dataset: dict[str, Any] | None = None,
        batch1_threads: int | str | None = "auto",
    ) -> None:
        from dsnet.export.onnx import OnnxDynamicModel, export_dynamic

        if not (batch1_threads is None or batch1_threads == "auto" or isinstance(batch1_threads, int)):
            raise ValueError(f"batch1_threads must be 'auto', None or a thread count, got {batch1_threads!r}")

        self._tmp = None
        self._source = source if isinstance(source, DynamicNet) else None
        self.threads = threads
        if isinstance(source, DynamicNet):
            if folder is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="dsnet-serving-")
                folder = self._tmp.name
            self.folder = Path(folder)
            manifest = export_dynamic(source.eval(), self.folder / "dynamic.onnx", input_size, dataset=dataset)
        else:
            manifest = Path(source)
            self.folder = manifest.parent
        fixed = batch1_threads if isinstance(batch1_threads, int) else None
        self.bundle = OnnxDynamicModel(manifest, threads, batch1_threads=fixed)
        self._tune_batch1 = batch1_threads == "auto" and self.bundle.threads > 1
        self.batch1_tuning = self.bundle.tune_batch1_threads() if self._tune_batch1 else None
        self._np_bias: np.ndarray | None = None
        self.input_size = tuple(self.bundle.manifest["input_size"])
        super().__init__(self.bundle.routing_space, torch.from_numpy(self.bundle.bias_direction), bias)

    def _set_gate_bias(self, vector: Tensor | None) -> None:
        self._np_bias = None if vector is None else vector.numpy().astype(np.float32)

    def route(self, images: Tensor | np.ndarray) -> ServingOutput:
        x = images.detach().cpu().numpy() if isinstance(images, Tensor) else images
        logits, choice = self.bundle(x, gate_bias=self._np_bias)
        return ServingOutput(torch.from_numpy(logits), torch.from_numpy(np.asarray(choice, dtype=np.int64)))

    def static_network(self, subnet: int) -> Callable[[Tensor], Any]:
        from dsnet.export.onnx import export_static, interleaved_medians, ort_session

        if self._source is None:
            raise ValueError("static_network needs the model: this bundle was opened from files")
        path = export_static(self._source, subnet, self.folder / f"static{subnet}.onnx", self.input_size)
        threads = self.bundle.threads
        session = ort_session(path, threads)
        one = session
        if self._tune_batch1:  # as the bundle's batch-1 path: the faster of 1 and `threads`, timed on this graph
            sessions = {t: session if t == threads else ort_session(path, t) for t in sorted({1, threads})}
            x1 = np.zeros((1, *self.input_size), dtype=np.float32)
            medians = interleaved_medians({t: lambda i, s=s: s.run(None, {"input": x1}) for t, s in sessions.items()})
            one = sessions[min(medians, key=medians.__getitem__)]
        elif self.bundle.batch1_threads != threads:
            one = ort_session(path, self.bundle.batch1_threads)

        def run(x: Tensor | np.ndarray) -> np.ndarray:
            arr = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x, dtype=np.float32)
            return (one if arr.shape[0] == 1 else session).run(None, {"input": arr})[0]

        return run

    def describe(self) -> str:
        b = self.bundle
        one = "" if b.batch1_threads == b.threads else f", batch 1: {b.batch1_threads}"
        sessions = 1 + sum(p is not None for p in b.post)  # exit mode: choice 0 is the pre-gate graph's answer
        return f"onnx ({sessions} sessions, {b.threads} threads{one}, no spinning)"


def auto_runtime(device: str | torch.device = "cpu", batch_size: int = 1) -> tuple[str, ...]:
    """The runtimes ``runtime="auto"`` tries for this device type and batch size, best first (:data:`AUTO_RUNTIME`)."""
    kind = torch.device(device).type
    table = AUTO_RUNTIME.get(kind, AUTO_RUNTIME["cuda" if kind != "cpu" else "cpu"])
    return table["latency" if batch_size <= LATENCY_MAX_BATCH else "throughput"]


def _available(runtime: str, device: torch.device) -> bool:
    if runtime == "onnx":
        if device.type != "cpu":
            return False
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            return False
    return True


def build_serving(
    model: DynamicNet,
    runtime: str = "auto",
    *,
    bias: float = 0.0,
    batch_size: int = 1,
    threads: int | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    compile: Mapping[str, Any] | None = None,  # noqa: A002 - torch.compile's keyword arguments
    input_size: Sequence[int] | None = None,
    onnx_dir: str | os.PathLike | None = None,
    dataset: dict[str, Any] | None = None,
) -> ServingModel:
    """One serving runtime for ``model`` (a trained DynamicNet; put it on its device first).

    ``runtime``: one of :data:`RUNTIMES`, or ``"auto"`` (the first runtime of :func:`auto_runtime` that is
    installed, for the model's device and ``batch_size``). ``compile``: ``torch.compile`` keyword arguments for
    ``"compile"``. ``threads``: ONNX Runtime's intra-op threads (torch runtimes use the process's setting,
    ``dsnet.utils.threads.set_threads``). ``dtype``: run the torch runtimes in this dtype (weights cast once).
    """
    if runtime not in (*RUNTIMES, "auto"):
        raise ValueError(f"runtime must be one of {', '.join((*RUNTIMES, 'auto', 'measure'))}, got {runtime!r}")
    if not isinstance(model, DynamicNet):
        raise TypeError(f"expected a DynamicNet, got {type(model).__name__}")
    device = next(model.parameters()).device
    if runtime == "auto":
        runtime = next(r for r in auto_runtime(device, batch_size) if _available(r, device))
    common = {"bias": bias, "input_size": input_size}
    if runtime == "onnx":
        if device.type != "cpu":
            raise ValueError("runtime 'onnx' serves on the CPU: move the model there (model.cpu())")
        return OnnxServing(model, threads=threads, folder=onnx_dir, dataset=dataset, **common)
    torch_opts = {"dtype": dtype, "channels_last": channels_last, **common}
    if runtime == "eager":
        return EagerServing(model, **torch_opts)
    if runtime == "eager-split":
        return SplitServing(model, compile=None, **torch_opts)
    return SplitServing(model, compile=compile or {}, **torch_opts)


def check_serving(
    serving: ServingModel, model: DynamicNet, images: Tensor, biases: Sequence[float] = (0.0,)
) -> dict[str, Any]:
    """``serving`` against the eager dynamic model on ``images`` at each knob value: max abs diff, routing agreement.

    The eager reference is ``model(images, gate_bias=b * model.bias_direction())``. The serving object's knob
    is restored afterwards.
    """
    was = serving.bias
    out: dict[str, Any] = {"max_abs_diff": 0.0, "routing_agrees": True, "per_bias": []}
    ref_device = next(model.parameters()).device
    direction = model.bias_direction(getattr(serving, "input_size", None))
    try:
        for b in biases:
            serving.bias = b
            got = serving.route(images)
            with torch.inference_mode():
                ref = model(images.to(ref_device), return_routing=True, gate_bias=None if b == 0 else b * direction)
            diff = float((got.logits.float().cpu() - ref.logits.float().cpu()).abs().max())
            agree = bool(torch.equal(got.choice.cpu(), ref.choice.cpu()))
            out["per_bias"].append({"bias": b, "max_abs_diff": diff, "routing_agrees": agree})
            out["max_abs_diff"] = max(out["max_abs_diff"], diff)
            out["routing_agrees"] = out["routing_agrees"] and agree
    finally:
        serving.bias = was
    return out
