"""The `cogvlm` command line (also `python -m cogvlm`)."""
from __future__ import annotations

import argparse
import sys

from .convert.checkpoint import DTYPES

EXAMPLES = """examples:
  cogvlm convert ./cogvlm-chat-hf ./cogvlm-chat --dtype bf16
  cogvlm export-hf ./cogvlm-chat ./cogvlm-chat-hf-again
"""


def cmd_convert(args) -> None:
    from .convert import convert

    out = convert(args.src, args.dst, dtype=args.dtype, tokenizer=args.tokenizer, force=args.force)
    print(f"converted {args.src} -> {out}", file=sys.stderr)


def cmd_export_hf(args) -> None:
    from .convert import export_hf

    out = export_hf(args.src, args.out, dtype=args.dtype, force=args.force)
    print(f"exported {args.src} -> {out} (hub layout)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogvlm",
        description="CogVLM visual language model: convert checkpoints, ask about images, caption folders.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a hub-layout checkpoint folder to ours",
                       epilog="example: cogvlm convert ./cogvlm-chat-hf ./cogvlm-chat --dtype bf16")
    p.add_argument("src", help="folder laid out like the hub repository (safetensors or .bin shards + index)")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep the source dtype)")
    p.add_argument("--tokenizer", help="tokenizer.model to store with the weights (default: SRC/tokenizer.model)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-hf", help="write a converted checkpoint back in the hub layout",
                       epilog="example: cogvlm export-hf ./cogvlm-chat ./cogvlm-chat-hf")
    p.add_argument("src", help="a converted checkpoint folder")
    p.add_argument("out", help="output folder in the hub layout")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"cogvlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
