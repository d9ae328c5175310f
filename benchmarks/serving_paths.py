"""The serving runtimes of a trained dynamic model, timed on its real test images: which one to deploy.

    OMP_NUM_THREADS=2 python benchmarks/serving_paths.py --checkpoint runs/qs_s2/gate/best.ckpt \\
        --json benchmarks/results/serving_paths.json

For every runtime of ``dsnet.serving_model`` (eager ``DynamicNet``, the eager split, the compiled split, the ONNX
bundle) it times, in one interleaved loop per batch size and with the same threads, the dynamic model (its own
gate routing every image) and every routed sub-network as a static network in the same runtime, plus the eager
static networks (``model.extract(k)``): at batch 1 image after image over the first ``--images`` test images, and
at each larger batch size one call on the first images. It reports per runtime the dynamic model's ms, its
speed-up over the widest routed network in the same runtime and over the eager widest (the noise rule of
``dsnet.bench.timing.speedup_claim``: ``?`` = too noisy to claim), and the time-per-multiply-add ratio of the
dynamic model to the static networks it routes to (mix-weighted; the target is at most 1.10x). Export and
compilation happen before any timing and are reported on their own (build seconds, graphs compiled).

The fastest dynamic model per batch size is what ``dsnet.export.serving.AUTO_RUNTIME`` must name first
(``tests/test_serving_paths.py`` checks the committed JSON against it). The images are the checkpoint's test
split ("val"), prepared with its recorded data recipe (``--data DIR`` to relocate the dataset).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import dsnet
from dsnet.bench.serving import bench_serving_paths, format_serving_report
from dsnet.data import first_images
from dsnet.data.recipe import with_recorded_recipe
from dsnet.export.serving import RUNTIMES
from dsnet.utils.allocator import ALLOCATOR_SETTINGS, steady_allocator
from dsnet.utils.io import atomic_write_json
from dsnet.utils.threads import set_threads, warn_line


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _runtimes(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in RUNTIMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"runtimes are {', '.join(RUNTIMES)}; got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a gate checkpoint (dsnet train gate)")
    p.add_argument("--data", default=None, help="where the checkpoint's dataset lives (default: as recorded)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 256])
    p.add_argument("--images", type=int, default=64, help="test images timed one by one at batch 1 (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15 at batch 1, else 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default 2)")
    p.add_argument("--runtimes", type=_runtimes, default=list(RUNTIMES))
    p.add_argument("--allocator", choices=ALLOCATOR_SETTINGS, default="steady", help="as dsnet's --allocator")
    p.add_argument("--json", default=None, help="write the report here (e.g. benchmarks/results/serving_paths.json)")
    p.add_argument("--markdown", default=None, help="write the tables here (default: the --json path, .md)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.allocator == "steady":
        steady_allocator()
    threads = set_threads(args.threads, warn=warn_line)
    loaded = dsnet.load(args.checkpoint)
    data = dict((loaded.config or {}).get("data") or {})
    if not data:
        raise SystemExit(f"{args.checkpoint} records no data config: cannot read its test images")
    if args.data is not None:
        data["root"] = args.data
    data = with_recorded_recipe(data, {"name": loaded.dataset, "recipe": loaded.recipe})
    need = max(max(args.batch_sizes), args.images)
    try:
        images, info = first_images(data, "val", need)
    except ValueError as err:
        raise SystemExit(f"{args.checkpoint}: {err}") from None
    log(loaded.describe())
    log(f"{images.shape[0]} {info.name} test images, {threads} threads, runtimes {', '.join(args.runtimes)}")
    t0 = time.perf_counter()
    report = bench_serving_paths(
        loaded.model,
        images,
        runtimes=args.runtimes,
        batch_sizes=args.batch_sizes,
        batch1_images=args.images,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=threads,
        log=log,
    )
    report["checkpoint"] = str(args.checkpoint)
    report["model"] = loaded.spec
    report["images"] = f"the first {images.shape[0]} images of {info.name}'s test split, its recorded recipe"
    report["wall_seconds"] = time.perf_counter() - t0
    text = format_serving_report(report)
    print(text)
    if args.json:
        atomic_write_json(report, args.json)
        md = Path(args.markdown or Path(args.json).with_suffix(".md"))
        md.write_text(text + "\n")
        log(f"wrote {args.json} and {md}")
    elif args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
