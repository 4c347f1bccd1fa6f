"""Where a batch-1 prefill's time goes: the matmul rate cuBLAS reaches at the prefill's own shapes, and the kernels of
one prefill in bf16 and int4 (eager, then with compiled layers). Full size, random weights, one GPU.

    python bench/profile_prefill.py [--preset cogvlm-chat-hf] [--rows 18] [--no-int4] [--vit]

--vit: only the ViT + adapter of one image (eager, then compiled layers), with the per-kind summary of
bench/profile_steps.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import cuda_time, make_prompt  # noqa: E402
from bench.random_weights import random_model  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.generate import DecodeSession  # noqa: E402
from cogvlm.quantize import QuantSpec, pack_model, quantize_model  # noqa: E402
from cogvlm.speed import compile_layers  # noqa: E402


def matmul_rates(cfg: CogVLMConfig, rows: int) -> None:
    """x @ W.T at the ViT's and the vision expert's shapes, for the tokens of 1, 8 and 32 images."""
    v, t = cfg.vision, cfg.text
    shapes = [("ViT qkv", v.hidden_size, 3 * v.hidden_size), ("ViT dense", v.hidden_size, v.hidden_size),
              ("ViT fc1", v.hidden_size, v.intermediate_size), ("ViT fc2", v.intermediate_size, v.hidden_size),
              ("expert qkv", t.hidden_size, 3 * t.hidden_size),
              ("expert gate_up", t.hidden_size, 2 * t.intermediate_size),
              ("expert down", t.intermediate_size, t.hidden_size)]
    for images in (1, 8, 32):
        M = images * rows
        for name, K, N in shapes:
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            s = cuda_time(lambda: a @ w.t(), warmup=3, iters=10)
            print(f"M={M:6d} {name:15s} {K:5d}->{N:5d}: {s * 1e6:8.1f} us, {2 * M * K * N / s / 1e12:4.0f} TFLOP/s")


def kernels(model, ids, types, pixels, label: str, rows: int) -> None:
    session = DecodeSession(model, 1, ids.shape[1] + 8)
    run = lambda: session.prefill(ids, types, pixel_values=pixels)  # noqa: E731
    ms = cuda_time(run) * 1e3  # (its warm-up compiles what is compiled)
    vit = cuda_time(lambda: model.encode_images(pixels)) * 1e3
    print(f"\n{label}: prefill {ms:.1f} ms, ViT + adapter {vit:.1f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def vit_kernels(model, pixels, label: str, rows: int) -> None:
    from bench.profile_steps import summary

    ms = cuda_time(lambda: model.encode_images(pixels)) * 1e3
    print(f"\n{label}: ViT + adapter {ms:.1f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.encode_images(pixels)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))
    summary(prof, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--rows", type=int, default=18, help="kernels listed per profile")
    ap.add_argument("--no-int4", action="store_true")
    ap.add_argument("--vit", action="store_true", help="only the ViT + adapter, eager and compiled")
    args = ap.parse_args()
    cfg = CogVLMConfig.from_name(args.preset)
    if args.vit:
        with torch.no_grad():
            model = random_model(cfg)
            pixels = make_prompt(cfg, 1, 24)[2]
            vit_kernels(model, pixels, "bf16, eager", args.rows)
            compile_layers(model)
            vit_kernels(model, pixels, "bf16, compiled layers", args.rows)
        return
    with torch.no_grad():
        matmul_rates(cfg, (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1)  # ViT tokens: patches + cls
        model = random_model(cfg)
        ids, types, pixels = make_prompt(cfg, 1, 24)
        kernels(model, ids, types, pixels, "bf16, eager", args.rows)
        if not args.no_int4:
            quantize_model(model, QuantSpec("int4", 128))
            pack_model(model, torch.bfloat16)
            kernels(model, ids, types, pixels, "int4 g128, eager", args.rows)
            t0 = time.perf_counter()
            compile_layers(model)
            kernels(model, ids, types, pixels, "int4 g128, compiled layers", args.rows)
            print(f"(compiling and timing: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
