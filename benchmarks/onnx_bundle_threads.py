"""ONNX Runtime session options for the dynamic bundle: thread spinning on (onnxruntime's default) vs off.

Exports a model's dynamic bundle and its widest routed sub-network, then times, per batch size, four variants
in rotating blocks (each block: a few untimed calls, then timed calls; the median per block, then the median of
blocks): the bundle and the widest sub-network alone, each with spinning on and off, same intra-op threads.
Blocks rather than single calls, because a spinning pool keeps burning the cores for a while after its run and
would slow whatever is timed right after it.

    python benchmarks/onnx_bundle_threads.py --model ds_resnet8_tiny --threads 2 --batch-sizes 1,32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dsnet
from dsnet.bench.routing import mix_choices
from dsnet.bench.runner import default_mix
from dsnet.export.onnx import OnnxDynamicModel, export_dynamic, export_static, ort_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ds_resnet8_tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--blocks", type=int, default=7, help="timed blocks per variant")
    p.add_argument("--calls", type=int, default=40, help="timed calls per block")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = dsnet.create_model(args.model).eval()
    space = model.routing_space
    widest = max(space, key=lambda k: model.subnet_macs()[k])
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_dynamic(model, Path(tmp) / "dynamic.onnx")
        static = export_static(model, widest, Path(tmp) / "widest.onnx")
        variants = {
            "bundle, spinning on": OnnxDynamicModel(manifest, args.threads, spinning=True),
            "bundle, spinning off": OnnxDynamicModel(manifest, args.threads, spinning=False),
            "widest alone, spinning on": ort_session(static, args.threads, spinning=True),
            "widest alone, spinning off": ort_session(static, args.threads, spinning=False),
        }
        print(f"{args.model}, {args.threads} intra-op threads, forced mix {default_mix(len(space))}; ms per batch")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            x = np.random.default_rng(0).standard_normal((batch, *model.default_input_size), dtype=np.float32)
            choice = mix_choices(default_mix(len(space)), batch, seed=0).numpy()
            calls = {
                name: (lambda v=v, x=x, c=choice: v(x, choice=c)) if isinstance(v, OnnxDynamicModel)
                else (lambda v=v, x=x: v.run(None, {"input": x}))
                for name, v in variants.items()
            }  # fmt: skip
            medians: dict[str, list[float]] = {name: [] for name in calls}
            names = list(calls)
            for block in range(args.blocks):
                for name in names[block % len(names) :] + names[: block % len(names)]:
                    for _ in range(5):
                        calls[name]()
                    times = []
                    for _ in range(args.calls):
                        t0 = time.perf_counter()
                        calls[name]()
                        times.append((time.perf_counter() - t0) * 1e3)
                    medians[name].append(statistics.median(times))
            print(f"batch {batch}:")
            for name, ms in medians.items():
                q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
                print(f"  {name:28s} {statistics.median(ms):7.3f}  (blocks IQR {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main()
