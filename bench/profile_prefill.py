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


def vit_options(cfg: CogVLMConfig) -> None:
    """The ViT's attention under each SDPA backend, and fc1 + GELU with the GELU in cuBLASLt's epilogue (the tanh
    approximation) against the exact GELU as a separate pass, at one image's shapes."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.accuracy import relative

    v = cfg.vision
    L, H, hd = v.num_patches + 1, v.num_heads, v.head_dim
    q, k, vv = (torch.randn(1, H, L, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    want = F.scaled_dot_product_attention(q.float(), k.float(), vv.float())
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                got = F.scaled_dot_product_attention(q, k, vv)
                us = cuda_time(lambda: F.scaled_dot_product_attention(q, k, vv), warmup=3, iters=20) * 1e6
            err = relative(got, want)
            print(f"ViT attention {backend.name:20s}: {us:7.1f} us, rel. err vs fp32 {err:.2e}")
        except RuntimeError as e:
            print(f"ViT attention {backend.name:20s}: not available ({str(e).splitlines()[0][:80]})")
    x = torch.randn(L, v.hidden_size, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(v.intermediate_size, v.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(v.intermediate_size, device="cuda", dtype=torch.bfloat16) * 0.02
    exact = lambda: F.gelu(F.linear(x, w, b))  # noqa: E731
    fused = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()))
    for name, fn in (("fc1 then exact GELU", exact), ("fc1 with cuBLASLt GELU", fused)):
        us = cuda_time(fn, warmup=3, iters=20) * 1e6
        err = relative(fn(), ref)
        print(f"{name:24s}: {us:7.1f} us, rel. err vs fp32 exact {err:.2e}")


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
            vit_options(cfg)
            model = random_model(cfg)
            pixels = make_prompt(cfg, 1, 24)[2]
            vit_kernels(model, pixels, "bf16, eager", args.rows)
            compile_layers(model)
            vit_kernels(model, pixels, "bf16, compiled layers", args.rows)
            from cogvlm.vision_graph import graph_vision

            want = model.encode_images(pixels)
            graph_vision(model)  # as a decode session with CUDA graphs does
            ms = cuda_time(lambda: model.encode_images(pixels)) * 1e3
            same = torch.equal(model.encode_images(pixels), want)
            print(f"\nbf16, compiled layers, replayed from a CUDA graph: ViT + adapter {ms:.1f} ms "
                  f"(output {'equal to' if same else 'DIFFERENT from'} the ordinary call's)")
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
