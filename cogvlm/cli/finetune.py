"""`cogvlm finetune`: the command line of `cogvlm.finetune` (presets experts / lora / full, resume, export).

Only argument parsing lives here; the parser is built from plain strings so that `cogvlm finetune --help` does not
import torch, and `run` imports `cogvlm.finetune` when the command runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .options import GROUP_SIZE_CHOICES, QUANTIZE_CHOICES

DESCRIPTION = "Fine-tuning CogVLM: trainable-parameter presets, LoRA, checkpoints that resume exactly, and export."
HELP = "fine-tune a converted checkpoint (presets experts / lora / full), or train from scratch"
EXAMPLES = """examples:
  cogvlm finetune --model ./cogvlm-chat --data train.jsonl --eval-data eval.jsonl --out runs/x \\
      --preset experts --gradient-checkpointing --batch-size 1 --grad-accum 8 --steps 2000 --save-every 200
  cogvlm finetune --model ./cogvlm-chat --data train.jsonl --out runs/lora --preset lora --lora-rank 16
  cogvlm finetune --model ./cogvlm-chat --data train.jsonl --out runs/qlora --preset lora --quantize int4 \
      --gradient-checkpointing                        # QLoRA: LoRA over a frozen int4 base
  cogvlm finetune --resume runs/x            # continue exactly where runs/x stopped
  cogvlm finetune --init config.json --data train.jsonl --out runs/gpu --batch-size 512 --lr 2e-3 \
      --warmup-steps 300 --max-minutes 5 --workers 12      # as many steps as fit in 5 minutes
data format (JSONL, one record per line):
  {"image": "images/1.png", "conversations": [{"role": "user", "content": "What is it?"},
                                               {"role": "assistant", "content": "a red circle"}]}
"""
PRESETS = ("experts", "lora", "full")  # cogvlm.finetune.PRESETS, named here without importing torch
DTYPES = ("bf16", "fp16", "fp32")  # cogvlm.shards.DTYPES
TEMPLATES = ("chat", "vqa", "base")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `cogvlm finetune` on the CLI's subparsers."""
    p = subparsers.add_parser("finetune", help=HELP, description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None here so that on --resume only the options given on the command line override the saved ones.
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="converted checkpoint folder to fine-tune")
    src.add_argument("--init", metavar="CONFIG",
                     help="train from scratch: a cogvlm_config.json / hub config.json / preset name, initialised by "
                          "init_weights(seed); the preset defaults to full")
    g.add_argument("--tokenizer", help="tokenizer.model (default: the one in --model, or beside the --init config)")
    g.add_argument("--data", help="training data, JSONL")
    g.add_argument("--eval-data", help="held-out data, JSONL: loss and greedy exact-match accuracy")
    g.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, final/ (required unless --resume RUN)")
    g.add_argument("--template", choices=TEMPLATES, help="prompt template (default: the model's)")
    g.add_argument("--all-turns", action="store_true", default=None,
                   help="one example per assistant turn of multi-turn records (default: the last turn only)")
    g.add_argument("--max-length", type=int, help="longest sequence, in tokens (default 2048)")
    g = p.add_argument_group("what trains")
    g.add_argument("--preset", choices=PRESETS, help="experts (default: adapter + visual experts), lora, full")
    g.add_argument("--train", action="append", metavar="PATTERN", help="also train parameters matching PATTERN")
    g.add_argument("--freeze", action="append", metavar="PATTERN", help="freeze parameters matching PATTERN")
    g.add_argument("--lora-rank", type=int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha/rank (default 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--lora-targets", nargs="+", metavar="PATTERN",
                   help="linear layers to adapt (default: vision_expert_qkv vision_expert_dense)")
    g.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="QLoRA: quantize the frozen base to int8 or int4 (with --preset lora; exported dequantized)")
    g.add_argument("--group-size", type=int, choices=GROUP_SIZE_CHOICES, help="int4 group size (default 128)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 for lora, 1e-5 otherwise)")
    g.add_argument("--min-lr-ratio", type=float, help="final lr of the cosine, as a fraction of --lr (default 0)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices (default 0)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 3%% of the steps)")
    g.add_argument("--steps", type=int, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the data when --steps is not given (default 1)")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch (default 1)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, help="seed of data order, dropout, LoRA and --init weights (default 0)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each ViT block / decoder layer in backward (less memory, ~30%% more time)")
    g = p.add_argument_group("device")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=DTYPES,
                   help="weights and compute: default bf16 on GPU (with autocast), fp32 on CPU")
    g.add_argument("--trainable-dtype", choices=DTYPES,
                   help="dtype of the trained parameters and their AdamW state (default fp32)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--image-cache-mb", type=float,
                   help="preprocessed images kept in memory, per process (default 1024)")
    g.add_argument("--workers", type=int,
                   help="data worker processes that read and preprocess the next batches (default 0: none)")
    g.add_argument("--max-minutes", type=float,
                   help="wall-clock budget from the start of the run to the last step: the step count is fitted "
                        "to it (at most --steps), so the schedule ends with the time; then evaluation and export")
    g = p.add_argument_group("evaluation, checkpoints, export")
    g.add_argument("--log-every", type=int, help="steps between progress lines on stderr (default 10)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default 0: only at the end)")
    g.add_argument("--eval-max-examples", type=int, help="evaluate on at most this many eval examples")
    g.add_argument("--eval-batch-size", type=int, help="(default: --batch-size)")
    g.add_argument("--no-eval-generate", dest="eval_generate", action="store_false", default=None,
                   help="evaluate the loss only (no greedy generation / exact match)")
    g.add_argument("--max-new-tokens", type=int, help="generation limit in evaluation (default 32)")
    g.add_argument("--eval-only", action="store_true",
                   help="no training: print the loss and exact match of --model on --eval-data as JSON")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 0: none)")
    g.add_argument("--keep-checkpoints", type=int, help="keep the latest N checkpoints (default 2)")
    g.add_argument("--resume", metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its latest checkpoint (or from this checkpoint folder)")
    g.add_argument("--no-export", dest="export", action="store_false", default=None,
                   help="do not write RUN/final at the end")
    g.add_argument("--export-dtype", choices=DTYPES, help="dtype of RUN/final (default: the source's)")
    g.add_argument("--export-hf", metavar="DIR", help="also write the final model in the hub layout to DIR")


def config_from_args(args: argparse.Namespace):
    """The `TrainConfig` of the options given on the command line; with --resume, the others come from the
    checkpoint's config."""
    from ..finetune import TrainConfig, find_checkpoint, read_checkpoint_state

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if args.resume:
        ckpt = find_checkpoint(args.resume)
        saved = read_checkpoint_state(ckpt)["config"]
        if "model" in given:
            saved["init"] = None
        if "init" in given:
            saved["model"] = None
        given = {**saved, **given}
        if args.out is None:
            given["out"] = str(ckpt.parent.parent)  # RUN/checkpoints/step-N -> RUN
    if given.get("init") and "preset" not in given:
        given["preset"] = "full"  # from scratch, everything trains
    for required in ("data", "out"):
        if not given.get(required):
            raise ValueError(f"--{required} is required")
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    return TrainConfig(**given)


def run(args: argparse.Namespace) -> None:
    from ..finetune import evaluate_checkpoint, train

    if args.eval_only:
        if not args.model or not args.eval_data:
            raise ValueError("--eval-only needs --model and --eval-data")
        result = evaluate_checkpoint(
            args.model, args.eval_data, args.tokenizer, args.device, args.dtype, args.template,
            args.max_length or 2048, bool(args.all_turns), args.eval_batch_size or args.batch_size or 8,
            args.eval_generate is not False, args.max_new_tokens or 32, args.eval_max_examples, args.threads)
        print(json.dumps(result, indent=2))
        return
    result = train(config_from_args(args))
    if result["final"] is not None:
        print(f"fine-tuned model: {result['final']}", file=sys.stderr)
