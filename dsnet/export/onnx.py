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
  - ``<name>.manifest.json``: format tag, model name, routing space, file names.

  :class:`OnnxDynamicModel` is the router: it runs the pre-gate graph once for
  the batch, takes ``argmax(gate_logits + bias)`` per sample, runs each
  routed graph once on its group of samples and puts the outputs back in input
  order, exactly as ``DynamicNet.route`` does in eager mode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dsnet.export.compact import compact_copy
from dsnet.models.base import DynamicNet
from dsnet.utils.io import atomic_write_json

__all__ = [
    "MANIFEST_FORMAT",
    "export_static",
    "export_dynamic",
    "OnnxDynamicModel",
    "ort_session",
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


def _export(module: nn.Module, example: Tensor, path: Path, input_name: str, output_names: list[str]) -> Path:
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch dimension and weights inside the file."""
    _require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    module = module.eval()
    with torch.no_grad():
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
    program.save(str(path), external_data=False)
    return path


def _example(model: DynamicNet, input_size: Sequence[int] | None, batch: int = 2) -> Tensor:
    size = tuple(input_size or model.default_input_size)
    ref = next(model.parameters())
    return torch.randn(batch, *size, device=ref.device, dtype=ref.dtype)


def export_static(
    model: DynamicNet, subnet: int, out: str | os.PathLike, input_size: Sequence[int] | None = None
) -> Path:
    """Export sub-network ``subnet`` as one ONNX graph (``input`` -> ``logits``), compact weights only."""
    k = model.check_subnet(subnet)
    static = model.extract(k).eval()
    return _export(static, _example(model, input_size), Path(out), "input", ["logits"])


class _PreGate(nn.Module):
    """Shared part of dynamic inference: features for the routed part, and the gate's logits."""

    def __init__(self, model: DynamicNet) -> None:
        super().__init__()
        self.model = model
        self.subnet = model.routing_space[0]  # every routed sub-network shares the pre-gate widths

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, z = self.model.forward_pre(x, self.subnet)
        return h, self.model.gate.logits(z)


class _PostGate(nn.Module):
    def __init__(self, model: DynamicNet, subnet: int) -> None:
        super().__init__()
        self.model = model
        self.subnet = subnet

    def forward(self, h: Tensor) -> Tensor:
        return self.model.forward_post(h, self.subnet)


def _bundle_paths(out: Path) -> tuple[Path, Path, list[Path]]:
    base = out.with_suffix("") if out.suffix == ".onnx" else out
    return base.with_suffix(".onnx"), base.with_suffix(".manifest.json"), []


def export_dynamic(
    model: DynamicNet, out: str | os.PathLike, input_size: Sequence[int] | None = None, model_name: str | None = None
) -> Path:
    """Export the dynamic model as a bundle (pre-gate graph, one graph per routing choice, manifest).

    Returns the manifest's path. ``out`` names the pre-gate graph (``dynamic.onnx``);
    the other files sit beside it with the same stem.
    """
    if model.gate_mode != "pre":
        raise ValueError(
            f"ONNX export of a dynamic model with gate_mode={model.gate_mode!r} is not supported yet; "
            "export its sub-networks (--subnet K) instead"
        )
    model = model.eval()
    pre_path, manifest_path, _ = _bundle_paths(Path(out))
    x = _example(model, input_size)
    k0 = model.routing_space[0]
    pre_model = compact_copy(model, lambda m: _PreGate(m)(x))
    _export(_PreGate(pre_model), x, pre_path, "input", ["features", "gate_logits"])
    with torch.no_grad():
        h, _ = model.forward_pre(x, k0)
    posts = []
    macs = model.subnet_macs(tuple(x.shape[1:]))
    for j, k in enumerate(model.routing_space):
        post_model = compact_copy(model, lambda m, k=k: m.forward_post(h, k))
        path = pre_path.with_name(f"{pre_path.stem}.post{j}.onnx")
        _export(_PostGate(post_model, k), h, path, "features", ["logits"])
        posts.append({"choice": j, "subnet": k, "file": path.name, "macs": macs[k]})
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": model_name or type(model).__name__,
        "input_size": list(x.shape[1:]),
        "routing_space": list(model.routing_space),
        "pre": {"file": pre_path.name, "inputs": ["input"], "outputs": ["features", "gate_logits"]},
        "post": posts,
    }
    atomic_write_json(manifest, manifest_path)
    return manifest_path


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (all optimisations on)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("onnxruntime is not installed (pip install dsnet[export])") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxDynamicModel:
    """The router of an exported dynamic bundle: ``logits, choice = OnnxDynamicModel(path)(images)``.

    ``path`` is the manifest, the pre-gate ``.onnx`` beside it, or their
    common stem. ``gate_bias`` (one value per routing choice) is added to the
    gate logits, as ``DynamicNet.forward(gate_bias=...)`` does.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        path = Path(path)
        manifest_path = path if path.suffix == ".json" else _bundle_paths(path)[1]
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no dynamic ONNX bundle manifest at {manifest_path}")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path} is not a dsnet dynamic ONNX manifest ({MANIFEST_FORMAT})")
        root = manifest_path.parent
        self.routing_space: list[int] = self.manifest["routing_space"]
        self.pre = ort_session(root / self.manifest["pre"]["file"], threads)
        self.post = [ort_session(root / p["file"], threads) for p in self.manifest["post"]]

    def __call__(
        self, images: np.ndarray, gate_bias: Sequence[float] | None = None, choice: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, classes) and routing choices (N,). ``choice`` forces decisions (benchmarks, tests)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        features, gate_logits = self.pre.run(None, {"input": images})
        if choice is None:
            if gate_bias is not None:
                gate_logits = gate_logits + np.asarray(gate_bias, dtype=gate_logits.dtype)
            choice = gate_logits.argmax(axis=1)
        counts = np.bincount(choice, minlength=len(self.post))
        if counts.max() == len(choice):  # the whole batch agrees: no gather/scatter
            j = int(counts.argmax())
            return self.post[j].run(None, {"features": features})[0], choice
        out = None
        for j, count in enumerate(counts):
            if count == 0:
                continue
            idx = np.flatnonzero(choice == j)
            part = self.post[j].run(None, {"features": np.ascontiguousarray(features[idx])})[0]
            if out is None:
                out = np.empty((len(choice), *part.shape[1:]), dtype=part.dtype)
            out[idx] = part
        return out, choice


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
    from dsnet.bench.routing import forced_routing

    bundle = OnnxDynamicModel(manifest, threads)
    n = images.shape[0]
    choices = torch.arange(n) % len(model.routing_space)
    with torch.inference_mode(), forced_routing(model, choices):
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
