"""Training steps with glibc malloc's thresholds fixed (``--allocator steady``) or adaptive (``system``).

One process per setting; run them alternately, on an otherwise idle machine::

    for a in system steady system steady; do python benchmarks/allocator_training.py --allocator $a; done

A step is a sandwich-rule supernet step as stage I takes it (widest, slimmest and two middle routing choices,
each forward and backward, then one SGD step) on random images at batch 256, 2 threads. Prints the median ms per
step over ``--steps`` timed steps (after 3 untimed) and the process's kernel and user CPU seconds in them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import dsnet
from dsnet.utils.allocator import ALLOCATOR_SETTINGS, allocator_setting, steady_allocator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--allocator", choices=ALLOCATOR_SETTINGS, default="steady")
    p.add_argument("--model", default="ds_resnet8_tiny")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.allocator == "steady":
        steady_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dsnet.create_model(args.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, *model.default_input_size)
    y = torch.randint(0, model.num_classes, (args.batch,))
    space = model.routing_space
    order = [space[-1], space[0], *space[1:-1][:2]]

    def step() -> None:
        opt.zero_grad()
        for k in order:
            F.cross_entropy(model(x, subnet=k), y).backward()
        opt.step()

    for _ in range(3):
        step()
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{allocator_setting()} allocator {args.model} b{args.batch}: {statistics.median(times) * 1e3:.1f} ms/step "
          f"(kernel {after.ru_stime - before.ru_stime:.1f} s, user {after.ru_utime - before.ru_utime:.1f} s "
          f"over {args.steps} steps)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
