"""`cogvlm quantize SRC DST --mode int8|int4`: write a weight-only quantized checkpoint, once, shard by shard."""
from __future__ import annotations

import argparse
import sys

from .options import GROUP_SIZE_CHOICES, QUANTIZE_CHOICES, UsageError

EPILOG = """examples:
  cogvlm quantize ./cogvlm-chat ./cogvlm-chat-int4 --mode int4
  cogvlm quantize THUDM/cogvlm-chat-hf ./cogvlm-chat-int8 --mode int8 --tokenizer tokenizer.model
  cogvlm ask --model ./cogvlm-chat-int4 photo.jpg "What is on the table?"

SRC is a converted folder, a hub-layout folder or a hub id. The output is a converted folder whose config records
the quantization; --model loads it quantized as it is (nothing is quantized again at start). Quantized: both
experts' QKV, dense and MLP matrices in every decoder layer, the adapter, and the ViT's blocks unless
--no-quantize-vision, and with int8 lm_head; the embeddings and norms keep the source dtype. See docs/quantize.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="write a weight-only int8/int4 quantized checkpoint",
                              description="Quantize a checkpoint's linear layers to int8 (per output channel) or int4 "
                                          "(grouped, asymmetric), streaming it shard by shard.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="converted folder, hub-layout folder or hub id")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--mode", required=True, choices=QUANTIZE_CHOICES,
                   help="int8 (per output channel) or int4 (grouped)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZE_CHOICES,
                   help="int4: inputs per scale/zero (default 128; smaller is more accurate and a little larger)")
    vision = p.add_mutually_exclusive_group()
    vision.add_argument("--quantize-vision", dest="quantize_vision", action="store_true", default=None,
                        help="quantize the ViT's blocks too (the default)")
    vision.add_argument("--no-quantize-vision", dest="quantize_vision", action="store_false",
                        help="keep the ViT in the source dtype")
    p.add_argument("--tokenizer", help="tokenizer.model to store with the weights (default: SRC/tokenizer.model)")
    p.add_argument("--revision", help="hub revision, when SRC is a hub id")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs, e.g. cuda (default cpu; same result)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    return p


def run(args) -> None:
    if args.group_size is not None and args.mode != "int4":
        raise UsageError("--group-size is for --mode int4 (int8 has one scale per output channel)")
    from ..quantize.checkpoint import quantize_checkpoint

    out = quantize_checkpoint(args.src, args.dst, args.mode, args.group_size, args.quantize_vision,
                              tokenizer=args.tokenizer, force=args.force, device=args.device, revision=args.revision)
    print(f"quantized {args.src} -> {out} ({args.mode})", file=sys.stderr)
