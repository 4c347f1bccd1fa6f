"""The quantized products alone, at CogVLM's shapes: Triton int8 (`cogvlm.quantize.triton_mm`), tinygemm (torch's
int4 kernel) and, from two rows, tinygemm's words dequantized + cuBLAS (`cogvlm.quantize.tinygemm`) against bf16
cuBLAS, and at prefill sizes the Triton dequantization + cuBLAS, with the copy bandwidth measured in the same run.

    python bench/quant_kernels.py [--preset cogvlm-chat-hf] [--rows 1 8 32 28 64] [--copies C] [--json OUT]

Each product is timed inside a CUDA graph of 20 launches (as the decode step replays them), after its autotuning;
with --copies C the launches cycle through C weights (give enough that they outgrow the 50 MB L2, as a decode step's
32 layers do; with one, a weight that fits L2 is read from it on every launch after the first).
GB/s counts the bytes of the weight in its own format (bf16: 2 per value, int8: 1 + scales, int4: 1/2 + groups);
the speedup is against bf16 at the same shape and rows. Each result is checked against the dequantized weight.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import copy_bandwidth  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.fusion import fused_kernels  # noqa: E402
from cogvlm.quantize import int4_rows, tinygemm, triton_mm  # noqa: E402,F401  (they register their ops)
from cogvlm.quantize.linear import dequantize_int4, quantize_int4, quantize_int8  # noqa: E402


def graph_time(fn, reps: int = 20, rounds: int = 5) -> float:
    """Seconds per call of `fn`, replayed from a CUDA graph of `reps` calls (best of `rounds`)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # autotuning and allocator warm-up happen here, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    return best


def shapes(cfg: CogVLMConfig) -> list[tuple[str, int, int]]:
    t, v = cfg.text, cfg.vision
    return [("qkv", t.hidden_size, 3 * t.hidden_size), ("dense", t.hidden_size, t.hidden_size),
            ("gate_up", t.hidden_size, 2 * t.intermediate_size), ("down", t.intermediate_size, t.hidden_size),
            ("ViT fc1", v.hidden_size, v.intermediate_size), ("ViT fc2", v.intermediate_size, v.hidden_size)]


def candidates(w: torch.Tensor, group: int, rows: int):
    """name -> (function of x, weight bytes, dequantized reference weight)."""
    q8, q4 = quantize_int8(w), quantize_int4(w, group)
    w8 = (q8["weight"].float() * q8["scales"].float()[:, None]).bfloat16()
    w4 = dequantize_int4(q4["weight"], q4["scales"], q4["zeros"], torch.bfloat16)
    n4 = q4["weight"].numel() + 4 * q4["scales"].numel()
    out = {"bf16": (lambda x: F.linear(x, w), 2 * w.numel(), w),
           "int8 triton": (lambda x: torch.ops.cogvlm.int8_mm(x, q8["weight"], q8["scales"]), w.numel(), w8),
           "int8 dequant+GEMM": (lambda x: F.linear(x, torch.ops.cogvlm.int8_dequantize(
               q8["weight"], q8["scales"], x.dtype)), w.numel(), w8),
           "int4 triton dequant+GEMM": (lambda x: F.linear(x, torch.ops.cogvlm.int4_dequantize(
               q4["weight"], q4["scales"], q4["zeros"], x.dtype)), n4, w4)}
    if rows <= triton_mm.MAX_ROWS:  # what the layers run at these sizes: the products, not a dequantized copy
        out = {k: v for k, v in out.items() if "GEMM" not in k}
    if w.shape[0] % 16 == 0 and rows <= 1024:  # (tinygemm is built for few rows; the layers run it up to any size)
        tiles = next(t for t in (8, 4, 2) if w.shape[1] % (t * 16) == 0)
        packed = torch.ops.aten._convert_weight_to_int4pack(q4["weight"].contiguous(), tiles)
        sz = torch.stack([q4["scales"], q4["zeros"]], -1).transpose(0, 1).contiguous()
        out["int4 tinygemm"] = (lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz), n4, w4)
        if rows > 1 and tiles == 8:  # the same words dequantized, then cuBLAS (the layers' path from 25 rows)
            out["int4 words+GEMM"] = (lambda x: F.linear(x, torch.ops.cogvlm.tinygemm_dequantize(
                packed, sz, group, x.dtype)), n4, w4)
        if tiles == 8 and rows <= 64 and int4_rows.supported(group, w.dtype):
            out["int4 rows"] = (lambda x: torch.ops.cogvlm.int4_rows(x, packed, sz, group), n4, w4)
            out["int4 rows atomic"] = (lambda x: int4_rows.launch_int4_rows(x, packed, sz, group, last=False), n4, w4)
    return out


def model_check(cfg: CogVLMConfig) -> None:
    """The same quantized weights through the model with the Triton kernels and without (COGVLM_TRITON=0)."""
    import dataclasses
    import os

    from bench.quantize_bench import prompt
    from bench.random_weights import random_model
    from cogvlm.quantize import QuantSpec, pack_model, quantize_model

    small = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                                vision=dataclasses.replace(cfg.vision, num_hidden_layers=2))
    for spec in (QuantSpec("int8"), QuantSpec("int4", 128)):
        model = random_model(small, device=torch.device("cuda"))
        quantize_model(model, spec)
        pack_model(model, torch.bfloat16)
        ids, types, pixels = prompt(small, 1, 24, torch.device("cuda"))
        text = types[0] == 0
        got = {}
        for flag in ("1", "0"):
            os.environ["COGVLM_TRITON"] = flag
            with torch.no_grad():
                got[flag] = model(ids, types, pixel_values=pixels).logits[0, text].float()
                got[flag + "gen"] = model.generate(ids, types, pixel_values=pixels, max_new_tokens=16, eos_id=-1)[0]
        os.environ.pop("COGVLM_TRITON")
        err = ((got["1"] - got["0"]).norm() / got["0"].norm()).item()
        same = sum(a == b for a, b in zip(got["1gen"], got["0gen"])) / len(got["0gen"])
        print(f"model check {spec.describe()}: Triton vs torch ops, logits rel. error {err:.2e}, "
              f"greedy tokens equal {same:.0%}", flush=True)
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 1226])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--shapes", nargs="+", help="only these shapes (qkv, dense, gate_up, down, 'ViT fc1', ...)")
    ap.add_argument("--copies", type=int, default=1, help="weights each product cycles through (past L2)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model-check", action="store_true", help="first: a 2-layer full-width model's logits with "
                    "the Triton kernels against torch's ops (COGVLM_TRITON=0)")
    args = ap.parse_args()
    cfg = CogVLMConfig.from_name(args.preset)
    if args.model_check:
        model_check(cfg)
    bw = copy_bandwidth() / 1e9
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy {bw:.0f} GB/s", flush=True)
    results = []
    print(f"weights cycled per product: {args.copies}", flush=True)
    for name, K, N in [s for s in shapes(cfg) if not args.shapes or s[0] in args.shapes]:
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(args.copies)]
        for rows in args.rows:
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            base = None
            sets = [candidates(w, args.group_size, rows) for w in weights]
            for kind, (fn, nbytes, ref) in sets[0].items():
                fns, turn = [c[kind][0] for c in sets], itertools.count()
                with fused_kernels():  # the dequantization compiled, as in a decode step or compiled layers
                    s = graph_time(lambda: fns[next(turn) % len(fns)](x))
                y, want = fn(x).float(), F.linear(x.float(), ref.float())
                err = ((y - want).norm() / want.norm()).item()
                base = base or s
                results.append({"shape": name, "K": K, "N": N, "rows": rows, "kernel": kind, "us": s * 1e6,
                                "GB_s": nbytes / s / 1e9, "of_copy": nbytes / s / 1e9 / bw, "vs_bf16": base / s,
                                "rel_err": err})
                r = results[-1]
                print(f"{name:8s} {K:5d}->{N:5d} M={rows:3d} {kind:18s} {r['us']:8.1f} us {r['GB_s']:6.0f} GB/s "
                      f"({r['of_copy']:4.0%} of copy) {r['vs_bf16']:5.2f}x bf16  err {err:.1e}", flush=True)
    if hasattr(int4_rows, "_int4_rows"):  # the configurations int4_rows' autotuning chose, by (bucket, N, K)
        for key, config in int4_rows._int4_rows.cache.items():
            print(f"int4_rows {key[:3]}: {config}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"copy_GB_s": bw, "card": torch.cuda.get_device_name(),
                                         "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
