"""`cogvlm convert SRC DST` (hub layout -> ours) and `cogvlm export-hf SRC OUT` (ours -> hub layout)."""
from __future__ import annotations

import argparse
import sys

from .options import DTYPE_CHOICES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert a hub-layout checkpoint folder to ours",
                              epilog="example: cogvlm convert ./cogvlm-chat-hf ./cogvlm-chat --dtype bf16")
    p.add_argument("src", help="folder laid out like the hub repository (safetensors or .bin shards + index)")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast weights (default: keep the source dtype)")
    p.add_argument("--tokenizer", help="tokenizer.model to store with the weights (default: SRC/tokenizer.model)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")

    e = subparsers.add_parser("export-hf", help="write a converted checkpoint back in the hub layout",
                              epilog="example: cogvlm export-hf ./cogvlm-chat ./cogvlm-chat-hf")
    e.add_argument("src", help="a converted checkpoint folder")
    e.add_argument("out", help="output folder in the hub layout")
    e.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast weights (default: keep)")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def run(args) -> None:
    from ..convert import convert, export_hf

    if args.command == "convert":
        out = convert(args.src, args.dst, dtype=args.dtype, tokenizer=args.tokenizer, force=args.force)
        print(f"converted {args.src} -> {out}", file=sys.stderr)
    else:
        out = export_hf(args.src, args.out, dtype=args.dtype, force=args.force)
        print(f"exported {args.src} -> {out} (hub layout)", file=sys.stderr)
