"""Full-size CogVLM split over several GPUs by a device map, against the same weights on one GPU.

    python bench/device_map_check.py [--gpus 2 4] [--budget 20GiB]

For each GPU count N: a balanced plan over N budgets (`--budget` each; with N=4 and 20GiB this emulates four 24 GB
cards), weights placed straight on their block's device, then the last-position logits of one image + 24 text
tokens and 32 greedy tokens, compared with one GPU (exact equality expected: the same kernels on the same
numbers), per-GPU peak memory and decode tok/s: eagerly through the hooks (DecodeSession turns graphs off across
devices) and with one CUDA graph per device segment (`cogvlm.parallel.segments.SegmentedStep`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import make_prompt  # noqa: E402
from bench.random_weights import random_model  # noqa: E402
from cogvlm.parallel import device_map as dm  # noqa: E402
from cogvlm.parallel import plan as pl  # noqa: E402
from cogvlm.parallel.segments import SegmentedStep  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.generate import DecodeSession  # noqa: E402


def greedy(model, ids, types, pixels, new_tokens: int, segmented: bool = False):
    """Prefill + new_tokens - 1 decode steps; returns the tokens and the decode rate (steps only)."""
    session = DecodeSession(model, 1, ids.shape[1] + new_tokens, cuda_graph=False if segmented else None)
    tok = session.prefill(ids, types, pixel_values=pixels).argmax(-1)
    step = session.step
    if segmented:
        step = SegmentedStep(model, session.caches, session.key_valid, session.cache_pos, session.next_pos,
                             session.tokens).step
    tokens = [tok]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = step(tok).argmax(-1)
        tokens.append(tok)
    torch.cuda.synchronize()
    return torch.stack(tokens, 1).cpu(), (new_tokens - 1) / (time.perf_counter() - t0)


def run(model, ids, types, pixels, new_tokens: int, segmented: bool = False):
    with torch.no_grad():
        logits = model(ids, types, pixel_values=pixels, last_logits_only=True).logits[:, -1].float().cpu()
        greedy(model, ids, types, pixels, 4, segmented)  # warm-up: compilation and capture stay out of the timing
        tokens, tok_s = greedy(model, ids, types, pixels, new_tokens, segmented)
    return logits, tokens, tok_s


def peaks() -> dict:
    return {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--gpus", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--budget", default="20GiB")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    cfg = CogVLMConfig.from_name(args.preset)
    ids, types, pixels = make_prompt(cfg, 1, 24)
    results = {"card": torch.cuda.get_device_name(), "gpus_present": torch.cuda.device_count()}

    model = random_model(cfg, device="cuda:0")
    ref_logits, ref_tokens, tok_s = run(model, ids, types, pixels, args.new_tokens)
    results["one_gpu"] = {"decode_tok_s": round(tok_s, 1), "peak_GiB": peaks()}
    del model
    torch.cuda.empty_cache()

    for n in args.gpus:
        if n > torch.cuda.device_count():
            results[f"{n}_gpus"] = "not enough GPUs"
            continue
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        budgets = pl.parse_max_memory(",".join(f"{i}={args.budget}" for i in range(n)))
        plan = pl.plan(cfg, budgets, batch_size=1, context=ids.shape[1] + args.new_tokens, strategy="balanced")
        blocks = dm.block_devices(plan, cfg)
        model = random_model(cfg, device="cuda:0", place=lambda name: dm.device_for_param(blocks, name))
        dm.apply_device_map(model, blocks)
        misplaced = [n for n, p in model.named_parameters() if p.device != dm.device_for_param(blocks, n)]
        print(f"{n} GPUs: embed on {model.llm.embed.weight.device}, {len(misplaced)} misplaced {misplaced[:3]}",
              file=sys.stderr)
        logits, tokens, tok_s = run(model, ids, types, pixels, args.new_tokens)
        _, seg_tokens, seg_tok_s = run(model, ids, types, pixels, args.new_tokens, segmented=True)
        results[f"{n}_gpus"] = {
            "plan_GiB": {d: round(u.total / 2**30, 2) for d, u in plan.devices.items()},
            "peak_GiB": peaks(),
            "decode_tok_s": round(tok_s, 1),
            "logits_equal": bool(torch.equal(logits, ref_logits)),
            "logits_max_abs_diff": (logits - ref_logits).abs().max().item(),
            "tokens_equal": bool(torch.equal(tokens, ref_tokens)),
            "segmented_decode_tok_s": round(seg_tok_s, 1),  # one CUDA graph per device segment
            "segmented_vs_one_gpu": round(seg_tok_s / results["one_gpu"]["decode_tok_s"], 3),
            "segmented_tokens_equal": bool(torch.equal(seg_tokens, ref_tokens)),
        }
        print(plan.format_table(), file=sys.stderr)
        del model
        torch.cuda.empty_cache()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
