"""`cogvlm plan`: which device would hold which block, from per-device memory budgets; no weights are read.

It plans with the inputs the model commands plan with when given `--device-map auto|balanced` / `--max-memory`: the
same batch (`--batch-size`, caption's batch), context (a session can grow to max_position_embeddings), dtype (the
one they would load in here) and last-position logits (generation), so that a plan that fits here fits there.
"""
from __future__ import annotations

import argparse
import json
import sys

from .options import DTYPE_CHOICES, UsageError

STRATEGY_CHOICES = ("auto", "balanced")  # = cogvlm.parallel.device_map.STRATEGIES (this module must not import torch)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="plan which device holds which block, from per-device memory budgets",
        epilog="examples:\n  cogvlm plan --model cogvlm-chat-hf --max-memory 0=20GiB,1=20GiB\n"
               "  cogvlm plan --model ./cogvlm-chat --max-memory 0=12GiB,cpu=40GiB --batch-size 8  # caption's batch\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset (cogvlm-chat-hf, ...), config file or checkpoint folder")
    p.add_argument("--max-memory", required=True, help="budgets, e.g. 0=20GiB,1=20GiB,cpu=60GiB (GiB/GB/MiB/MB)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="rows decoded together: 1 for ask/chat, caption's --batch-size for caption (default 1)")
    p.add_argument("--context", type=int, metavar="TOKENS",
                   help="KV-cache tokens per row, image included (default: max_position_embeddings, as the model "
                        "commands reserve)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="weights' dtype (default: the one ask/chat/caption load in here: bf16 on GPUs that support "
                        "it, else fp32)")
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto",
                   help="auto: fill devices in order; balanced: even out the GPUs (default auto)")
    p.add_argument("--full-logits", action="store_true",
                   help="reserve the logits of every position (a scoring or training forward), not only the last "
                        "one (generation)")
    p.add_argument("--json", action="store_true", help="print a machine-readable object")
    return p


def run(args) -> int:
    """Print the plan; exit with status 2 and the numbers when it cannot fit."""
    import torch

    from ..loading import default_dtype
    from ..parallel.plan import DoesNotFitError, plan
    from ..shards import DTYPES

    cfg = load_config(args.model)
    if args.dtype is None:  # as load_model decides without --device/--dtype
        dtype = default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        dtype = DTYPES[args.dtype]
    try:
        result = plan(cfg, args.max_memory, args.batch_size, args.context, dtype, args.strategy, args.full_logits)
    except DoesNotFitError as e:
        if args.json:
            print(json.dumps({"error": str(e), "needed": e.needed, "available": e.available}))
        print(f"cogvlm plan: {e}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.format_table())
    return 0


def load_config(name: str):
    """--model as a preset name, a config file or a checkpoint folder; one line naming --model otherwise."""
    from pathlib import Path

    from ..config import PRESETS, CogVLMConfig

    if not Path(name).exists() and name.split("/")[-1] not in PRESETS:
        raise UsageError(f"--model {name!r} is not a preset ({', '.join(PRESETS)}), a config file or a checkpoint "
                         "folder")
    try:
        return CogVLMConfig.load(name)
    except (OSError, ValueError, KeyError, TypeError) as e:  # an unreadable folder or file, or not a CogVLM config
        detail = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ValueError(f"--model {name}: cannot read a CogVLM config there ({detail})") from None
