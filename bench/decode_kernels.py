"""The batch-1 decode kernels (`cogvlm.decode_kernels`) alone, against what the ordinary step runs for the same
work, at CogVLM-17B's shapes, with the copy bandwidth measured in the same run.

    python bench/decode_kernels.py [--preset cogvlm-chat-hf] [--slots 1536] [--filled 1380] [--json OUT]

Each is timed inside a CUDA graph of 20 launches (`bench/quant_kernels.graph_time`), after autotuning. The weight
products: cuBLAS `F.linear` (plus the separate RMSNorm / SiLU gate / residual-add kernels where the fused kernel does
that work too) against `gemv`; GB/s counts the weight's bytes; "int8" rows: the int8 layers' one-row product
(`triton_mm.int8_mm`, in the cuBLAS column) with the same separate kernels, against `gemv` on the codes. Attention: `F.scaled_dot_product_attention` with the
boolean mask over every cache slot (the ordinary step) against `attend`; GB/s counts the filled slots' keys and values.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import copy_bandwidth  # noqa: E402
from bench.quant_kernels import graph_time  # noqa: E402
from cogvlm import decode_kernels as D  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.llm import rms_norm  # noqa: E402
from cogvlm.quantize import triton_mm  # noqa: E402
from cogvlm.quantize.linear import quantize_int8  # noqa: E402
from cogvlm.visual_expert import silu_gate  # noqa: E402


def product_rows(cfg) -> list[dict]:
    t, dt = cfg.text, torch.bfloat16
    d, f = t.hidden_size, t.intermediate_size
    x32, nw = torch.randn(d, device="cuda"), torch.rand(d, device="cuda", dtype=dt) + 0.5
    rows = []
    for name, n, k in (("qkv + norm", 3 * d, d), ("dense + residual", d, d), ("gate_up + norm + gate", 2 * f, d),
                       ("down + residual", d, f)):
        w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
        x = torch.randn(k, device="cuda", dtype=dt)
        if "norm" in name:
            gate = "gate" in name
            plain = lambda w=w, gate=gate: (silu_gate if gate else lambda y: y)(  # noqa: E731
                F.linear(rms_norm(x32, nw, 1e-5), w))
            fused = lambda w=w, gate=gate: D.gemv(x32, w, norm=(nw, 1e-5), gate=gate, out_dtype=dt)  # noqa: E731
        else:
            plain = lambda w=w, x=x: x32[: w.shape[0]] + F.linear(x, w).float()  # noqa: E731
            fused = lambda w=w, x=x: D.gemv(x, w, residual=x32[: w.shape[0]])  # noqa: E731
        rows.append(int8_row(name, w, x, x32, nw))
        got, want = fused(), plain()
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        t_plain, t_fused, t_gemm = graph_time(plain), graph_time(fused), graph_time(lambda w=w, x=x: F.linear(x, w))
        gb = 2 * w.numel() / 1e9
        rows.append({"kernel": name, "shape": f"{n}x{k}", "cublas_us": t_gemm * 1e6, "ordinary_us": t_plain * 1e6,
                     "fused_us": t_fused * 1e6, "cublas_GBs": gb / t_gemm, "fused_GBs": gb / t_fused,
                     "speedup": t_plain / t_fused, "rel_err": err})
    return rows


def int8_row(name: str, w, x, x32, nw) -> dict:
    """The same product on int8 codes: the quantized layers' own one-row product (+ the ordinary step's separate
    kernels) against the fused `gemv`; GB/s counts the int8 bytes."""
    q8 = quantize_int8(w)
    codes, scales = q8["weight"], q8["scales"]
    gate, norm = "gate" in name, "norm" in name
    if norm:
        plain = lambda: (silu_gate if gate else lambda y: y)(  # noqa: E731
            triton_mm.int8_mm(rms_norm(x32, nw, 1e-5)[None], codes, scales))
        fused = lambda: D.gemv(x32, codes, scales, norm=(nw, 1e-5), gate=gate, out_dtype=x.dtype)  # noqa: E731
    else:
        plain = lambda: x32[: w.shape[0]] + triton_mm.int8_mm(x[None], codes, scales)[0].float()  # noqa: E731
        fused = lambda: D.gemv(x, codes, scales, residual=x32[: w.shape[0]])  # noqa: E731
    err = ((fused().float().view(-1) - plain().float().view(-1)).norm() / plain().float().norm()).item()
    t_plain, t_fused = graph_time(plain), graph_time(fused)
    t_alone = graph_time(lambda: triton_mm.int8_mm(x[None], codes, scales))
    gb = codes.numel() / 1e9
    return {"kernel": "int8 " + name, "shape": f"{w.shape[0]}x{w.shape[1]}", "cublas_us": t_alone * 1e6,
            "ordinary_us": t_plain * 1e6, "fused_us": t_fused * 1e6, "cublas_GBs": gb / t_alone,
            "fused_GBs": gb / t_fused, "speedup": t_plain / t_fused, "rel_err": err}


def attention_row(cfg, slots: int, filled: int, batch: int = 1) -> dict:
    t, dt = cfg.text, torch.bfloat16
    H, hd = t.num_attention_heads, t.head_dim
    k, v = (torch.randn(batch, H, slots, hd, device="cuda", dtype=dt) for _ in range(2))
    q = torch.randn(batch, H, hd, device="cuda", dtype=dt)
    valid = torch.zeros(batch, slots, dtype=torch.bool, device="cuda")
    valid[:, :filled] = True
    pos = torch.tensor([filled - 1], device="cuda")
    ordinary = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None])  # noqa
    fused = lambda: D.attend(q, k, v, valid, pos)  # noqa: E731
    err = ((fused().float() - ordinary()[:, :, 0].float()).norm() / ordinary().float().norm()).item()
    t_plain, t_fused = graph_time(ordinary), graph_time(fused)
    gb = batch * 2 * 2 * H * filled * hd / 1e9
    return {"kernel": f"attention, batch {batch} ({filled} of {slots} slots)", "ordinary_us": t_plain * 1e6, "fused_us": t_fused * 1e6,
            "ordinary_GBs": gb / t_plain, "fused_GBs": gb / t_fused, "speedup": t_plain / t_fused, "rel_err": err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--slots", type=int, default=1536, help="cache slots (a session of one image + 24 + 128 tokens)")
    ap.add_argument("--filled", type=int, default=1380)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = CogVLMConfig.load(args.preset)
    copy = copy_bandwidth() / 1e9
    rows = product_rows(cfg) + [attention_row(cfg, args.slots, args.filled, b) for b in (1, 8)]
    print(f"copy bandwidth {copy:.0f} GB/s ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    print("| kernel | cuBLAS alone | ordinary step | fused kernel | GB/s (cuBLAS / fused) | speedup | rel. err |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        gbs = (f"{r['cublas_GBs']:.0f} / {r['fused_GBs']:.0f}" if "cublas_GBs" in r
               else f"{r['ordinary_GBs']:.0f} / {r['fused_GBs']:.0f}")
        cublas = f"{r['cublas_us']:.1f} us" if "cublas_us" in r else ""
        print(f"| {r['kernel']} | {cublas} | {r['ordinary_us']:.1f} us | {r['fused_us']:.1f} us | {gbs} | "
              f"{r['speedup']:.2f}x | {r['rel_err']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"copy_GBs": copy, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
