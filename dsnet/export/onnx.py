"""ONNX export of static sub-networks and of the whole dynamic model, checked against eager.

* A **static sub-network** is ``model.extract(k)``: plain ``torch.nn`` layers
  with compact weights, exported as one graph.
* The **dynamic model** is exported as a *bundle*, because a single graph that
  branches on the gate would either compute every branch (ONNX ``If`` needs a
  scalar condition, but decisions are per sample) or lose per-sample routing:

  - ``<name>.onnx``: the shared pre-gate part. Input ``input`` (N, C, H, W);
    outputs ``features`` (what the routed part consumes) and ``gate_logits``
    (N, len(routing_space)).
  - ``<name>.post<j>.onnx``: the routed part of routing choice ``j``
    (``features`` -> ``logits``), compact weights of that sub-network only.
  - ``<name>.manifest.json``: format tag, model name, routing space, file
    names, MACs, the routing rule (``router``, ``bias_direction``: the
    operating point at knob ``b`` is ``argmax(gate_logits + b *
    bias_direction)``; the stored ``budget_bias`` is already inside
    ``gate_logits``, ``budget_bias_in_gate_logits: true``), and what a
    server needs around the graphs: the
    ``preprocessing`` (input size, channels, layout, pixel scale, mean/std,
    resize and crop) and the ``class_names``, taken from the checkpoint's
    dataset record when exporting a checkpoint.

  :class:`OnnxDynamicModel` is the router: it runs the pre-gate graph once for
  the batch, takes ``argmax(gate_logits + gate_bias)`` per sample (``gate_bias``
  a vector, or ``bias * bias_direction`` for a scalar knob), runs each
  routed graph once on its group of samples and puts the outputs back in input
  order, exactly as ``DynamicNet.route`` does in eager mode. Its five-odd
  sessions run one after another, never together, so their thread pools are
  set up for that (``ort_session``): a fixed number of intra-op threads that
  sleep instead of spinning when idle. With onnxruntime's defaults every
  session's pool spins after each run and the next session's threads fight
  them for the cores (measured on 2 cores, ds_resnet8_tiny at batch 32: the
  bundle took 6.30 ms against 2.47 ms for its widest sub-network alone, and
  2.39 ms with spinning off).

Every exported graph also carries the preprocessing and class names as ONNX
metadata (``dsnet.preprocessing``, ``dsnet.class_names``, JSON), so a static
sub-network's single file is self-describing too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dsnet.export.compact import compact_copy
from dsnet.export.split import PostGate, PreGate
from dsnet.models.base import DynamicNet
from dsnet.utils.io import atomic_write_json

__all__ = [
    "MANIFEST_FORMAT",
    "preprocessing_spec",
    "export_static",
    "export_dynamic",
    "OnnxDynamicModel",
    "ort_session",
    "interleaved_medians",
    "check_static",
    "check_dynamic",
]

MANIFEST_FORMAT = "dsnet-onnx-dynamic-v1"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ValueError(f"ONNX export needs the 'export' extra (pip install dsnet[export]): {err}") from None


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence two messages the exporter prints on every call, and nothing else.

    * "torchvision is not installed. Skipping torchvision::nms" (and 3 more) is
      logged each time the exporter builds its op registry: dsnet never uses
      torchvision ops.
    * A ``FutureWarning`` about ``isinstance(treespec, LeafSpec)`` comes from
      torch's own exporter internals, not from anything we call.
    Other log records and warnings pass through.
    """
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _DropTorchvisionNotice()
    logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        logger.removeFilter(notice)


def _export(
    module: nn.Module,
    example: Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch dimension and weights inside the file."""
    _require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    module = module.eval()
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    program.model.metadata_props.update(metadata or {})
    program.save(str(path), external_data=False)
    return path


def preprocessing_spec(
    input_size: Sequence[int], dataset: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[str] | None]:
    """What a server must do to raw images before the graph, and the class names, from a dataset record.

    ``dataset`` is a checkpoint's ``dataset`` entry (``DatasetInfo`` as a dict,
    with its data ``recipe``); without one (random weights) mean and std are
    unknown (``None``). The input is float32 NCHW ``(pixel / 255 - mean) / std``
    after the resize and centre crop described by ``resize_shorter_side`` and
    ``center_crop``.
    """
    c, h, w = (int(v) for v in input_size)
    spec: dict[str, Any] = {
        "layout": "NCHW",
        "dtype": "float32",
        "input_size": [c, h, w],
        "channels": c,
        "color": "L" if c == 1 else "RGB",
        "pixel_scale": 1 / 255,
        "mean": None,
        "std": None,
        "resize_shorter_side": None,
        "center_crop": [h, w],
        "formula": "x = (pixel * pixel_scale - mean) / std, per channel",
    }
    if not dataset:
        return spec, None
    recipe = dataset.get("recipe") or {}
    spec["mean"] = list(recipe.get("mean") or dataset.get("mean") or []) or None
    spec["std"] = list(recipe.get("std") or dataset.get("std") or []) or None
    spec["dataset"] = dataset.get("name")
    fraction = float(recipe.get("eval_crop_fraction") or 1.0)
    spec["resize_shorter_side"] = int(h / fraction) if fraction < 1 else h
    names = dataset.get("class_names")
    return spec, list(names) if names else None


def _metadata(preprocessing: dict[str, Any] | None, class_names: Sequence[str] | None) -> dict[str, str]:
    meta = {}
    if preprocessing is not None:
        meta["dsnet.preprocessing"] = json.dumps(preprocessing)
    if class_names is not None:
        meta["dsnet.class_names"] = json.dumps(list(class_names))
    return meta


def _example(model: DynamicNet, input_size: Sequence[int] | None, batch: int = 2) -> Tensor:
    size = tuple(input_size or model.default_input_size)
    ref = next(model.parameters())
    return torch.randn(batch, *size, device=ref.device, dtype=ref.dtype)


def export_static(
    model: DynamicNet,
    subnet: int,
    out: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    dataset: dict[str, Any] | None = None,
) -> Path:
    """Export sub-network ``subnet`` as one ONNX graph (``input`` -> ``logits``), compact weights only.

    ``dataset`` (a checkpoint's dataset record) puts the preprocessing and class names in the file's metadata.
    """
    k = model.check_subnet(subnet)
    static = model.extract(k).eval()
    x = _example(model, input_size)
    meta = _metadata(*preprocessing_spec(x.shape[1:], dataset)) if dataset else None
    return _export(static, x, Path(out), "input", ["logits"], meta)


def _bundle_paths(out: Path) -> tuple[Path, Path, list[Path]]:
    base = out.with_suffix("") if out.suffix == ".onnx" else out
    return base.with_suffix(".onnx"), base.with_suffix(".manifest.json"), []


def export_dynamic(
    model: DynamicNet,
    out: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    model_name: str | None = None,
    dataset: dict[str, Any] | None = None,
) -> Path:
    """Export the dynamic model as a bundle (pre-gate graph, one graph per routing choice, manifest).

    Returns the manifest's path. ``out`` names the pre-gate graph (``dynamic.onnx``);
    the other files sit beside it with the same stem. ``dataset`` (a
    checkpoint's dataset record) gives the manifest's ``preprocessing`` mean,
    std and resize, and its ``class_names``.
    """
    model = model.eval()
    exit_mode = model.gate_mode == "exit"
    pre_path, manifest_path, _ = _bundle_paths(Path(out))
    x = _example(model, input_size)
    preprocessing, class_names = preprocessing_spec(x.shape[1:], dataset)
    meta = _metadata(preprocessing, class_names)
    k0 = model.routing_space[0]
    pre_model = compact_copy(model, lambda m: PreGate(m)(x))
    pre_outputs = ["features", "gate_logits"] + (["slim_logits"] if exit_mode else [])
    _export(PreGate(pre_model), x, pre_path, "input", pre_outputs, meta)
    with torch.no_grad():
        h, _ = model.forward_pre(x, k0)
    posts = []
    macs = model.subnet_macs(tuple(x.shape[1:]))
    for j, k in enumerate(model.routing_space):
        if exit_mode and j == 0:  # the pre-gate graph already returns it
            posts.append({"choice": 0, "subnet": k, "file": None, "output": "slim_logits", "macs": macs[k]})
            continue
        post_model = compact_copy(model, lambda m, k=k: m.forward_post(h, k))
        path = pre_path.with_name(f"{pre_path.stem}.post{j}.onnx")
        _export(PostGate(post_model, k), h, path, "features", ["logits"], meta)
        posts.append({"choice": j, "subnet": k, "file": path.name, "macs": macs[k]})
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": model_name or type(model).__name__,
        "input_size": list(x.shape[1:]),
        "preprocessing": preprocessing,
        "class_names": class_names,
        "routing_space": list(model.routing_space),
        "gate_mode": model.gate_mode,
        "router": model.router,
        "bias_direction": [float(v) for v in model.bias_direction(tuple(x.shape[1:]))],
        "budget_bias": [float(v) for v in model.gate.budget_bias],
        "budget_bias_in_gate_logits": True,
        "pre": {"file": pre_path.name, "inputs": ["input"], "outputs": pre_outputs},
        "post": posts,
    }
    atomic_write_json(manifest, manifest_path)
    return manifest_path


def ort_session(
    path: str | os.PathLike, threads: int | None = None, *, spinning: bool = False, profile_prefix: str | None = None
) -> Any:
    """An onnxruntime CPU session: ``threads`` intra-op threads (default: torch's count), all optimisations on.

    Sequential execution, one inter-op thread, and (``spinning=False``, the
    default) pools that sleep when idle instead of busy-waiting for the next
    run. Spinning buys a little latency for one session alone on a machine; it
    costs a lot wherever sessions or other work take turns on the same cores
    (the dynamic bundle, a server, an interleaved benchmark). ``profile_prefix``: ONNX Runtime's profiler on,
    its JSON written under that prefix by ``session.end_profiling()``.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("onnxruntime is not installed (pip install dsnet[export])") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_medians(calls: Mapping[Any, Callable[[int], Any]], rounds: int = 15, per_round: int = 20) -> dict:
    """Milliseconds per call of each ``calls[key](i)``: per round ``per_round`` calls of each key in turn, medians.

    One warm-up call each first. What :meth:`OnnxDynamicModel.tune_batch1_threads` and the serving runtime's
    static networks use to pick a thread count on the spot (the benchmarks time with ``dsnet.bench.timing``).
    """
    for fn in calls.values():
        fn(0)
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            start = time.perf_counter()
            for i in range(per_round):
                fn(i)
            times[key].append((time.perf_counter() - start) / per_round * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


class OnnxDynamicModel:
    """The router of an exported dynamic bundle: ``logits, choice = OnnxDynamicModel(path)(images)``.

    ``path`` is the manifest, the pre-gate ``.onnx`` beside it, or their
    common stem. ``gate_bias`` (one value per routing choice) is added to the
    gate logits, as ``DynamicNet.forward(gate_bias=...)`` does; ``bias`` (a
    scalar knob) adds ``bias * bias_direction``, the manifest's direction
    (``model.bias_direction()``; the bias ramp for manifests written before
    it was recorded). ``threads``
    intra-op threads per session (default: torch's count); the sessions never
    run at once, so their pools do not spin (see ``ort_session``).
    ``preprocessing`` and ``class_names`` come from the manifest;
    ``preprocess`` applies the former to uint8 images of the input size.

    A call with one image takes a path of its own: one scalar decision, the
    one routed graph, no grouping. ``batch1_threads`` gives that path its own
    sessions with another intra-op thread count (default: ``threads``). At
    batch 1 a small network's operators are too short to share: each parallel
    operator wakes a sleeping pool thread, and with 2 threads the bundle of
    ``ds_resnet8_tiny`` (two sessions per call) paid that twice as often as
    its widest network alone (``docs/benchmarks.md``, section "Batch 1").
    :meth:`tune_batch1_threads` measures both counts on the spot and keeps the
    faster.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        *,
        spinning: bool = False,
        batch1_threads: int | None = None,
    ) -> None:
        path = Path(path)
        manifest_path = path if path.suffix == ".json" else _bundle_paths(path)[1]
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no dynamic ONNX bundle manifest at {manifest_path}")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path} is not a dsnet dynamic ONNX manifest ({MANIFEST_FORMAT})")
        root = manifest_path.parent
        self.routing_space: list[int] = self.manifest["routing_space"]
        self.preprocessing: dict[str, Any] | None = self.manifest.get("preprocessing")
        self.class_names: list[str] | None = self.manifest.get("class_names")
        self.router: str = self.manifest.get("router", "logits")
        direction = self.manifest.get("bias_direction")
        if direction is None:  # written before the direction was recorded: the logits router's ramp
            r = len(self.routing_space)
            direction = np.linspace(1.0, -1.0, r).tolist() if r > 1 else [0.0]
        self.bias_direction = np.asarray(direction, dtype=np.float32)
        self._root = root
        self._spinning = spinning
        self.threads = int(threads or torch.get_num_threads())
        self.pre, self.post = self._sessions(self.threads)
        self.batch1_threads = self.threads
        self._batch1 = (self.pre, self.post)
        if batch1_threads is not None:
            self.set_batch1_threads(batch1_threads)

    def _sessions(self, threads: int) -> tuple[Any, list[Any]]:
        """The pre-gate session and one per routing choice (None: exit mode's choice 0, answered by the pre-gate)."""
        pre = ort_session(self._root / self.manifest["pre"]["file"], threads, spinning=self._spinning)
        post = [
            None if p["file"] is None else ort_session(self._root / p["file"], threads, spinning=self._spinning)
            for p in self.manifest["post"]
        ]
        return pre, post

    def set_batch1_threads(self, threads: int) -> None:
        """Serve calls of one image with ``threads`` intra-op threads (sessions of their own unless ``threads``)."""
        threads = int(threads)
        if threads < 1:
            raise ValueError(f"batch1_threads must be at least 1, got {threads}")
        self.batch1_threads = threads
        self._batch1 = (self.pre, self.post) if threads == self.threads else self._sessions(threads)

    def tune_batch1_threads(self, candidates: Sequence[int] | None = None, rounds: int = 15, calls: int = 20) -> dict:
        """Time one-image calls with each thread count (interleaved medians), keep the fastest; returns the times.

        Each timed call goes, in turn, to every routing choice (forced, on a zero image), so the whole bundle is
        measured, not only the routing a zero image gets. ``candidates`` default: 1 and ``threads``.
        """
        candidates = sorted(set(candidates or (1, self.threads)))
        x = np.zeros((1, *self.manifest["input_size"]), dtype=np.float32)
        choices = [np.array([j]) for j in range(len(self.post))]
        setups = {}
        for t in candidates:
            self.set_batch1_threads(t)
            setups[t] = self._batch1

        def run(t: int) -> Callable[[int], Any]:
            def call(i: int) -> Any:
                self._batch1 = setups[t]
                return self(x, choice=choices[i % len(choices)])

            return call

        medians = interleaved_medians({t: run(t) for t in candidates}, rounds, calls)
        best = min(medians, key=medians.__getitem__)
        self.batch1_threads, self._batch1 = best, setups[best]
        return {"batch1_threads": best, "ms_per_call": medians, "rounds": rounds, "calls": calls}

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, C, H, W)`` images already at the input size -> the graph's float32 input."""
        spec = self.preprocessing or {}
        if spec.get("mean") is None or spec.get("std") is None:
            raise ValueError("this bundle's manifest records no mean/std (exported without a checkpoint)")
        images = np.asarray(images)
        if images.ndim != 4 or list(images.shape[1:]) != list(spec["input_size"]):
            size = ", ".join(map(str, spec["input_size"]))
            raise ValueError(f"expected uint8 images of shape (N, {size}), got {images.shape}")
        mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((images.astype(np.float32) * np.float32(spec["pixel_scale"]) - mean) / std)

    def __call__(
        self,
        images: np.ndarray,
        gate_bias: Sequence[float] | None = None,
        choice: np.ndarray | None = None,
        *,
        bias: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, classes) and routing choices (N,). ``choice`` forces decisions (benchmarks, tests)."""
        if bias is not None:
            if gate_bias is not None:
                raise ValueError("pass gate_bias (a vector) or bias (a scalar knob), not both")
            gate_bias = np.float32(bias) * self.bias_direction
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape[0] == 1:
            return self._one(images, gate_bias, choice)
        features, gate_logits, *slim = self.pre.run(None, {"input": images})
        if choice is None:
            if gate_bias is not None:
                gate_logits = gate_logits + np.asarray(gate_bias, dtype=gate_logits.dtype)
            choice = gate_logits.argmax(axis=1)

        def run(j: int, idx: np.ndarray | None) -> np.ndarray:
            if self.post[j] is None:  # exit mode, choice 0: the slimmest's answer from the pre-gate graph
                return slim[0] if idx is None else slim[0][idx]
            part = features if idx is None else np.ascontiguousarray(features[idx])
            return self.post[j].run(None, {"features": part})[0]

        counts = np.bincount(choice, minlength=len(self.post))
        if counts.max() == len(choice):  # the whole batch agrees: no gather/scatter
            return run(int(counts.argmax()), None), choice
        out = None
        for j, count in enumerate(counts):
            if count == 0:
                continue
            idx = np.flatnonzero(choice == j)
            part = run(j, idx)
            if out is None:
                out = np.empty((len(choice), *part.shape[1:]), dtype=part.dtype)
            out[idx] = part
        return out, choice

    def _one(
        self, image: np.ndarray, gate_bias: Sequence[float] | np.ndarray | None, choice: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image: the same graphs and the same decision as a batch, one scalar argmax, no grouping."""
        pre, post = self._batch1
        features, gate_logits, *slim = pre.run(None, {"input": image})
        if choice is None:
            scores = gate_logits[0] if gate_bias is None else gate_logits[0] + np.asarray(gate_bias, gate_logits.dtype)
            j = int(scores.argmax())
        else:
            j = int(np.asarray(choice).reshape(-1)[0])
        routed = np.array([j], dtype=np.int64)
        if post[j] is None:  # exit mode, choice 0: the slimmest's answer from the pre-gate graph
            return slim[0], routed
        return post[j].run(None, {"features": features})[0], routed


def _max_diff(a: np.ndarray, b: Tensor) -> float:
    return float(np.abs(a - b.detach().cpu().numpy()).max())


def check_static(
    model: DynamicNet, subnet: int, path: str | os.PathLike, images: Tensor, threads: int | None = None
) -> float:
    """Max abs difference between the exported static graph and ``model(images, subnet=subnet)``."""
    session = ort_session(path, threads)
    with torch.inference_mode():
        ref = model(images, subnet=subnet)
    return _max_diff(session.run(None, {"input": images.cpu().numpy()})[0], ref)


def check_dynamic(
    model: DynamicNet, manifest: str | os.PathLike, images: Tensor, threads: int | None = None
) -> dict[str, Any]:
    """Compare the bundle with eager dynamic inference on ``images``, forced to every routing choice.

    Each image is routed to choice ``i mod len(routing_space)`` in both, so
    every routed graph is checked; the bundle's own (unforced) routing is
    compared with the eager gate's too. Returns the max abs differences.
    """
    bundle = OnnxDynamicModel(manifest, threads)
    n = images.shape[0]
    choices = torch.arange(n) % len(model.routing_space)
    with torch.inference_mode(), model.forced_routing(choices):
        ref = model(images, return_routing=True)
    out, _ = bundle(images.cpu().numpy(), choice=choices.numpy())
    with torch.inference_mode():
        free = model(images, return_routing=True)
    free_out, free_choice = bundle(images.cpu().numpy())
    return {
        "forced_max_abs_diff": _max_diff(out, ref.logits),
        "choices_checked": sorted(set(choices.tolist())),
        "gate_max_abs_diff": _max_diff(free_out, free.logits),
        "gate_choices_agree": bool((free_choice == free.choice.cpu().numpy()).all()),
    }
