"""One ViT block of CogVLM-17B's vision tower, four ways: eager, compiled as `cogvlm.speed` compiles it, and compiled
with inductor's max-autotune (Triton GEMM templates with the bias and the exact GELU in the epilogue, tried against
cuBLAS at every product). GPU time per block (63 calls replayed from one CUDA graph, as the vision graph runs them)
and the block's output error against fp32.

    python bench/vit_block.py [--preset cogvlm-chat-hf] [--images 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.accuracy import relative  # noqa: E402
from bench.bench import matmul_rate  # noqa: E402
from bench.quant_kernels import graph_time  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.speed import keep_addmm_fused  # noqa: E402
from cogvlm.vit import VisionBlock  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--images", type=int, default=1)
    args = ap.parse_args()
    v = CogVLMConfig.from_name(args.preset).vision
    torch.manual_seed(0)
    block = VisionBlock(v).cuda()
    for name, p in block.named_parameters():  # picture-like scales: small weights, unit-ish LayerNorm
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * (0.02 if "norm" not in name else 0.1) + (1.0 if name.endswith(
                "norm.weight") else 0.0))
    reference = block.float()
    L = v.num_patches + 1
    x = torch.randn(args.images, L, v.hidden_size, device="cuda")
    with torch.no_grad():
        want = reference(x, torch.float32)
        bf16 = VisionBlock(v).cuda().bfloat16()
        bf16.load_state_dict({k: t.bfloat16() for k, t in reference.state_dict().items()})
        rate = matmul_rate()
        flops = 2 * sum(p.numel() for n, p in bf16.named_parameters() if n.endswith("weight") and p.dim() == 2) * L
        flops = (flops + 4 * L * L * v.hidden_size) * args.images
        print(f"matmul rate {rate / 1e12:.0f} TFLOP/s; one block {flops / 1e9:.1f} GFLOP, floor "
              f"{flops / rate * 1e6:.1f} us ({args.images} image(s), {L} tokens)")
        variants = {"eager": lambda t: bf16(t, torch.bfloat16)}
        keep_addmm_fused()  # as compile_layers does
        variants["compiled (cogvlm.speed)"] = torch.compile(lambda t: bf16(t, torch.bfloat16), dynamic=True)
        variants["max-autotune, static"] = torch.compile(lambda t: bf16(t, torch.bfloat16), dynamic=False,
                                                         mode="max-autotune-no-cudagraphs")
        print("| variant | us per block | vs floor | rel. error vs fp32 | compile + tune s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, fn in variants.items():
            t0 = time.perf_counter()
            got = fn(x)
            torch.cuda.synchronize()
            setup = time.perf_counter() - t0
            s = graph_time(lambda: fn(x), reps=63)  # (63 blocks, as the tower runs them)
            print(f"| {name} | {s * 1e6:.1f} | {flops / rate / s:.0%} | {relative(got, want):.3e} | {setup:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
