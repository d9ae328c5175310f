"""``dsnet demo``: a smoke demo of dynamic inference on random inputs (no data needed)."""

from __future__ import annotations

import argparse

from dsnet.cli._args import Subcommands


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("demo", help="route random images through an untrained model (smoke test)")
    p.add_argument("--model", default="ds_mobilenet_v1_cifar")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dsnet.macs import count_macs
    from dsnet.models import create_model
    from dsnet.utils.table import format_table

    torch.manual_seed(args.seed)
    # the paper's pre-gate head: untrained, it routes everything one way; spread its logits so the demo
    # shows grouping (an untrained exit head routes random images one way whatever its weights)
    model = create_model(args.model, gate_mode="pre").eval()
    torch.nn.init.normal_(model.gate.slim_head.weight, std=2.0)
    x = torch.randn(args.batch_size, *model.default_input_size)
    with torch.inference_mode():
        result = model(x, return_routing=True)
    per_sample = count_macs(model, x)
    macs = model.subnet_macs()
    rows = [
        [k, str(model.subnets[k]).split(" ", 1)[1], round(macs[k] / 1e6, 2), int((result.subnet == k).sum())]
        for k in model.routing_space
    ]
    print(
        format_table(
            ["subnet", "widths", "MMACs", "samples routed"],
            rows,
            title=f"{args.model}: dynamic routing of {len(x)} random images",
        )
    )
    print(
        f"mean MACs per sample: {per_sample.float().mean() / 1e6:.2f} M "
        f"(widest routed {macs[model.routing_space[-1]] / 1e6:.2f} M)"
    )
    return 0
