"""``dsnet checkpoint convert``: rewrite a checkpoint from an older dsnet into the safe format."""

from __future__ import annotations

import argparse

from dsnet.cli._args import Subcommands, output_file


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint maintenance (convert an older checkpoint)")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    c = actions.add_parser(
        "convert",
        help="rewrite a checkpoint from an older dsnet so it loads without the unsafe unpickler",
        description=(
            "Older dsnet checkpoints store numpy RNG state, which dsnet no longer unpickles (it loads checkpoints "
            "with torch.load(weights_only=True), so a crafted file cannot run code). Converting reads the file "
            "with the full unpickler, which runs any code in it: only for files from a source you trust (--trust)."
        ),
    )
    c.add_argument("checkpoint")
    c.add_argument("--out", type=output_file, help="converted file (default: replace the checkpoint)")
    c.add_argument("--trust", action="store_true", help="I trust this file's source (required)")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.train.checkpoint import convert_checkpoint

    dst = convert_checkpoint(args.checkpoint, args.out or args.checkpoint, trust=args.trust)
    print(f"converted {args.checkpoint} -> {dst}")
    return 0
