"""Where the time goes: torch.profiler over one batch-1 prefill and a few decode steps (full size, random bf16).

    python bench/profile_steps.py [--preset cogvlm-chat-hf] [--rows 25] [--compiled] [--quantize int8|int4-g128]
                                  [--no-fast] [--cpu] [--batch B]

The decode steps run without a CUDA graph (the profiler then sees every kernel; their GPU times are the graph's,
the gaps between them are not). Besides torch's table, a summary per kind of kernel (weight products, attention,
generated element-wise kernels, copies, the rest) gives each kind's GPU time per step and its kernel count.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import make_prompt  # noqa: E402
from bench.random_weights import random_model  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.fusion import fused_kernels  # noqa: E402
from cogvlm.generate import DecodeSession  # noqa: E402

KINDS = [("weight products", ("gemv", "gemm", "xmma", "cutlass", "int8_r", "int4pack", "int4_rows", "nvjet", "splitk")),
         ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn", "attend")),
         ("generated (triton)", ("triton_",)),
         ("copies, fills", ("copy", "fill", "memcpy", "memset", "cat"))]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, words in KINDS if any(w in low for w in words)), "other")


def summary(prof, steps: int) -> None:
    """GPU time and kernel count per kind, per step."""
    time_us, count = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = e.self_cuda_time_total if t is None else t
        if t <= 0 or e.key.startswith(("ProfilerStep", "cudaGraph")):
            continue
        time_us[kind(e.key)] += t
        count[kind(e.key)] += e.count
    total = sum(time_us.values())
    print(f"{'kind':<22}{'us/step':>10}{'share':>8}{'kernels/step':>14}")
    for k in sorted(time_us, key=time_us.get, reverse=True):
        print(f"{k:<22}{time_us[k] / steps:>10.1f}{time_us[k] / total:>8.0%}{count[k] / steps:>14.1f}")
    print(f"{'total':<22}{total / steps:>10.1f}{'':>8}{sum(count.values()) / steps:>14.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compiled", action="store_true", help="compiled layers (cogvlm.speed), as `cogvlm caption`")
    ap.add_argument("--quantize", help="a bench/quantize_bench.py mode: int8, int4-g128, ...")
    ap.add_argument("--no-fast", action="store_true", help="decode with the model's step, not cogvlm.fast_decode")
    ap.add_argument("--cpu", action="store_true", help="also the host's time per op in the prefill (launch overhead)")
    ap.add_argument("--batch", type=int, default=1, help="rows of the prefill and the decode steps")
    args = ap.parse_args()
    cfg = CogVLMConfig.from_name(args.preset)
    model = random_model(cfg)
    if args.quantize:
        from bench.quantize_bench import parse_mode
        from cogvlm.quantize import pack_model, quantize_model

        quantize_model(model, parse_mode(args.quantize))
        pack_model(model, torch.bfloat16)
    if args.compiled:
        from cogvlm.speed import compile_layers

        compile_layers(model)
    B = args.batch
    ids, types, pixels = make_prompt(cfg, B, 24)
    session = DecodeSession(model, B, ids.shape[1] + 64, cuda_graph=False)
    if not args.no_fast:  # (a session without a graph keeps the model's step; the profile wants the graph's)
        from cogvlm.fast_decode import FastStep

        session.fast = FastStep.build(model, B, session.caches)
    print("decode step:", "cogvlm.fast_decode" if session.fast is not None else "the model's")
    tok = torch.zeros(B, dtype=torch.long, device="cuda")
    with torch.no_grad(), fused_kernels():  # (the decode step's fused kernels, as its graph records them)
        for _ in range(2):  # warm-up
            session.prefill(ids, types, pixel_values=pixels)
            session.step(tok)
        torch.cuda.synchronize()
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.cpu else [])
        with profile(activities=activities) as prof:
            session.prefill(ids, types, pixel_values=pixels)
            torch.cuda.synchronize()
        print(f"== prefill (batch {B}, one image + 24 text tokens a row)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        summary(prof, 1)
        if args.cpu:
            print("== prefill, host time per op")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                            max_name_column_width=70))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                session.step(tok)
            torch.cuda.synchronize()
        print(f"== {args.steps} decode steps (batch {B})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        summary(prof, args.steps)


if __name__ == "__main__":
    main()
