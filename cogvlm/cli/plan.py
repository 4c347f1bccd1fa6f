"""`cogvlm plan`: which device holds which block, from memory budgets. The work is `cogvlm.device_map.cmd_plan`;
the options are declared here so that `cogvlm --help` does not import torch."""
from __future__ import annotations

import argparse

from .options import DTYPE_CHOICES

STRATEGY_CHOICES = ("auto", "balanced")  # = cogvlm.device_map.STRATEGIES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="plan which device holds which block, from per-device memory budgets",
                              epilog="example: cogvlm plan --model cogvlm-chat-hf --max-memory 0=20GiB,1=20GiB")
    p.add_argument("--model", required=True, help="preset (cogvlm-chat-hf, ...), config file or checkpoint folder")
    p.add_argument("--max-memory", required=True, help="budgets, e.g. 0=20GiB,1=20GiB,cpu=60GiB (GiB/GB/MiB/MB)")
    p.add_argument("--batch-size", type=int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--context", type=int, help="tokens per row, image included (default: max_position_embeddings)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto",
                   help="auto: fill devices in order; balanced: even out the GPUs (default auto)")
    p.add_argument("--json", action="store_true", help="print a machine-readable object")
    return p


def run(args) -> int:
    from ..device_map import cmd_plan

    return cmd_plan(args)
