"""Every configuration of the batch-1 decode step's product (`decode_kernels._gemv`), and candidates that are not
in its autotuning list, at CogVLM-17B's four decoder shapes, bf16 and int8, against cuBLAS (bf16) and the int8
layers' own product; and of the int4 product (`decode_int4._int4_gemv`, groups of 128) against tinygemm. The pick
the product makes is timed too (autotuned, or this GPU's `MEASURED` entry). Each product rotates over copies of its
weight that together exceed the L2 cache, so that every call reads its weight from memory, as in a decode step;
last, the `MEASURED` entries these timings suggest for this GPU (`decode_kernels.MEASURED` for bf16 and int8,
`decode_int4.MEASURED` for int4: the shapes whose best configuration beats the pick by more than --margin).

    python bench/gemv_configs.py [--preset cogvlm-chat-hf] [--top 3] [--dtypes bf16 int8 int4] [--margin 0.03]
                                 [--extra-only]

(A few-row `tl.dot` version for batches 2-16, tried on an H200 on 2026-12-02, read 1.0-3.7 TB/s against cuBLAS's
2.6-4.0 at 8 rows, and was dropped: docs/benchmarks.md.)
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import copy_bandwidth  # noqa: E402
from bench.quant_kernels import graph_time  # noqa: E402
from cogvlm import decode_int4  # noqa: E402
from cogvlm import decode_kernels as D  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.quantize import triton_mm  # noqa: E402
from cogvlm.quantize.linear import Int4Linear, quantize_int8  # noqa: E402

# candidates outside the list: (BLOCK_N, BLOCK_K, warps, stages[, WORDS]); see decode_kernels._configs
EXTRA = [(8, 2048, 4, 1), (16, 2048, 8, 1), (4, 2048, 4, 1), (8, 1024, 8, 2), (16, 512, 8, 2),
         (16, 2048, 8, 1, True), (32, 1024, 8, 1, True), (8, 4096, 8, 1, True), (16, 1024, 8, 1, True),
         (4, 1024, 2, 1, True), (32, 512, 8, 1, True), (8, 1024, 4, 2, True), (16, 2048, 4, 1, True),
         (32, 1024, 4, 1, True), (8, 256, 2, 1, True)]
# (BLOCK_N, TILES, warps[, SPLIT]); see decode_int4._configs (its CANDIDATES are timed too)
EXTRA4 = [(8, 8, 4), (64, 2, 4), (16, 4, 4), (4, 8, 1), (8, 1, 1), (4, 2, 1), (8, 4, 2), (16, 2, 1), (16, 8, 4, 4),
          (8, 8, 2, 4), (32, 4, 4, 8), (32, 2, 2, 8), (64, 4, 8, 4), (32, 4, 2, 4), (16, 2, 1, 8), (8, 2, 1, 8),
          (64, 4, 4, 4), (16, 4, 2, 8), (32, 2, 2, 4)]
L2_BYTES = 200 * 2 ** 20  # rotate over at least this many bytes of weights


def configs(dtype: str, k: int, extra_only: bool = False):
    """The list's configurations and the extra ones, each pruned as the kernel's autotuner prunes its own."""
    if dtype == "int4":
        extra = decode_int4.CANDIDATES + decode_int4._configs(EXTRA4)
        tried = [(c, "") for c in decode_int4._int4_gemv.configs] + [(c, "extra") for c in extra]
    else:
        tried = [(c, "") for c in D._gemv.configs] + [(c, "extra") for c in D._configs(EXTRA)]
        kept = D._prune([c for c, _ in tried], {"INT8": dtype == "int8", "K": k})
        tried = [(c, tag) for c, tag in tried if any(c is p for p in kept)]
    return [(c, tag) for c, tag in tried if tag or not extra_only]


def describe(c) -> str:
    if "TILES" in c.kwargs:
        kw = c.kwargs
        split = f" split {kw['SPLIT']}" if kw["SPLIT"] > 1 else ""
        return f"{kw['BLOCK_N']}x{kw['TILES']} tiles w{c.num_warps}{split}"
    words = " words" if c.kwargs["WORDS"] else ""
    return f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}{words}"


def cases(cfg, dtype: str):
    """(name, weights (rotated), call(weight, config) for the fused kernel, reference call(weight), its fp32
    value, bytes, K, the shape's key in MEASURED)."""
    t = cfg.text
    d, f = t.hidden_size, t.intermediate_size
    x32 = torch.randn(f, device="cuda")
    nw = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    for name, n, k, norm, gate in (("qkv + norm", 3 * d, d, True, False), ("dense + residual", d, d, False, False),
                                   ("gate_up + norm + gate", 2 * f, d, True, True),
                                   ("down + residual", d, f, False, False)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        if dtype == "int4":
            yield int4_case(name, w, x32, nw, norm, gate)
            continue
        q8 = quantize_int8(w) if dtype == "int8" else None
        weight = q8["weight"] if q8 else w
        nbytes = weight.numel() * weight.element_size()
        copies = [weight] + [weight.clone() for _ in range(max(1, L2_BYTES // nbytes))]
        scales = q8["scales"] if q8 else None
        x = x32[:k] if norm else x32[:k].to(torch.bfloat16)
        r = None if norm else x32[:n]
        fused = lambda wt, config, x=x, r=r, norm=norm, gate=gate: D.gemv(  # noqa: E731
            x, wt, scales, norm=(nw, 1e-5) if norm else None, gate=gate, residual=r, out_dtype=torch.bfloat16,
            config=config)
        x2 = x.view(1, k).to(torch.bfloat16)
        reference = ((lambda wt, x2=x2: triton_mm.int8_mm(x2, wt, scales)) if q8 else
                     (lambda wt, x2=x2: F.linear(x2, wt)))
        dense = weight.float() * scales.float()[:, None] if q8 else weight.float()
        exact = fp32_product(x, dense, nw if norm else None, gate, r)
        key = D.measured_key(n // 2 if gate else n, k, norm, gate, not norm, dtype == "int8")
        yield name, copies, fused, reference, exact, nbytes, k, key


def fp32_product(x, dense, norm_weight, gate, residual):
    """The product's value in fp32 from the (dequantized) weight `dense`: what every kernel is compared with."""
    xf = x.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * norm_weight.float()
    y = F.linear(xf, dense)
    y = F.silu(y[: len(y) // 2]) * y[len(y) // 2:] if gate else y
    return y + residual if residual is not None else y


def int4_case(name, w, x32, nw, norm, gate):
    """`cases`' row for the int4 product: tinygemm layers (groups of 128) as `Int4Linear` packs them on CUDA."""
    n, k = w.shape
    with torch.no_grad():
        linear = torch.nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
    layer = Int4Linear.from_linear(linear, decode_path=True, group_size=128)
    layer.pack_for(w.device, torch.bfloat16)
    weight = (layer.packed, layer.scale_zeros)
    nbytes = layer.packed.numel() * 4 + layer.scale_zeros.numel() * 2
    copies = [weight] + [(weight[0].clone(), weight[1].clone()) for _ in range(max(1, L2_BYTES // nbytes))]
    x = x32[:k] if norm else x32[:k].to(torch.bfloat16)
    r = None if norm else x32[:n]
    fused = lambda wt, config: decode_int4.gemv4(  # noqa: E731
        x, wt[0], wt[1], norm=(nw, 1e-5) if norm else None, gate=gate, residual=r, out_dtype=torch.bfloat16,
        config=config)
    x2 = x.view(1, k).to(torch.bfloat16)
    reference = lambda wt: layer._kernel_mm(x2, wt[1], wt[0])  # noqa: E731
    exact = fp32_product(x, layer.dequantize(torch.float32), nw if norm else None, gate, r)
    return name, copies, fused, reference, exact, nbytes, k, (n // 2 if gate else n, k, norm, gate, not norm)


def rotating(fn, copies):
    cycle = itertools.cycle(copies)
    return lambda: fn(next(cycle))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "int8"])
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--extra-only", action="store_true", help="time only the configurations outside the list "
                    "(and the pick), not the list's own")
    ap.add_argument("--margin", type=float, default=0.03, help="how much faster a configuration must be to suggest it")
    args = ap.parse_args()
    cfg = CogVLMConfig.load(args.preset)
    copy = copy_bandwidth() / 1e9
    print(f"copy bandwidth {copy:.0f} GB/s ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    print("| weights | product | reference | gemv's pick | its error vs fp32 | best configurations (GB/s) |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    faster = {"int8/bf16": {}, "int4": {}}  # key -> the best configuration, where it beats the pick by > --margin
    for dtype in args.dtypes:
        for name, copies, fused, reference, exact, nbytes, k, key in cases(cfg, dtype):
            gbs = lambda s: nbytes / s / 1e9  # noqa: E731
            t_ref = graph_time(rotating(reference, copies))
            t_auto = graph_time(rotating(lambda wt: fused(wt, None), copies))
            got, want = fused(copies[0], None).float(), exact
            err = ((got - want).norm() / want.norm()).item()
            timed = []
            for config, tag in configs(dtype, k, args.extra_only):
                try:
                    timed.append((graph_time(rotating(lambda wt, c=config: fused(wt, c), copies)), config, tag))
                except Exception as e:  # noqa: BLE001 (a candidate that does not compile or fit: reported, skipped)
                    print(f"  ({describe(config)}: {type(e).__name__})", flush=True)
            best = ", ".join(f"{describe(c)}{' (' + tag + ')' if tag else ''}: {gbs(s):.0f}"
                             for s, c, tag in sorted(timed, key=lambda r: r[0])[: args.top])
            print(f"| {dtype} | {name} | {gbs(t_ref):.0f} | {gbs(t_auto):.0f} | {err:.1e} | {best} |", flush=True)
            t_best, c_best, _ = min(timed, key=lambda r: r[0]) if timed else (t_auto, None, "")
            if t_auto > (1 + args.margin) * t_best:
                table = "int4" if dtype == "int4" else "int8/bf16"
                faster[table][key] = entry(c_best)
    # (a configuration from the extra list must join the kernel's own list too: the interpreter tests run only those)
    for table, module in (("int8/bf16", "decode_kernels"), ("int4", "decode_int4")):
        if any(d in args.dtypes for d in table.split("/")):
            print(f"\n{module}.MEASURED entry for this GPU (best beats the pick by more than {args.margin:.0%}): "
                  f"{{{torch.cuda.get_device_name()!r}: {faster[table]!r}}}")


def entry(c) -> tuple:
    """A configuration as a MEASURED value: (BLOCK_N, BLOCK_K, warps, stages, WORDS), or for int4 (BLOCK_N, TILES,
    warps[, SPLIT])."""
    kw = c.kwargs
    if "TILES" in kw:
        return (kw["BLOCK_N"], kw["TILES"], c.num_warps) + ((kw["SPLIT"],) if kw["SPLIT"] > 1 else ())
    return kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages, kw["WORDS"]


if __name__ == "__main__":
    main()
