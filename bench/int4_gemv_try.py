"""Scratch: a one-row int4 product in Triton on a group-planar layout, against tinygemm, at the decoder's shapes.

Layout: row n's codes as int32 words, G / 8 words per group of G inputs; nibble m of word i of group g holds input
g * G + m * (G / 8) + i, so the eight nibbles of a tile of words meet eight contiguous slices of x, all in one group:
the scale and zero apply once per tile (y = sum_g s_g * sum (code - 8) x + z_g * sum x).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench import copy_bandwidth  # noqa: E402
from bench.quant_kernels import graph_time  # noqa: E402
from cogvlm.quantize.linear import quantize_int4, unpack_nibbles  # noqa: E402


@triton.autotune(configs=[triton.Config({"BLOCK_N": n, "T": t}, num_warps=w, num_stages=1)
                          for n, t, w in [(4, 2, 2), (4, 4, 2), (8, 2, 4), (8, 4, 4), (16, 2, 4), (16, 4, 8),
                                          (4, 8, 4), (8, 8, 8), (32, 2, 8), (2, 8, 2), (16, 8, 8), (8, 2, 2)]],
                 key=["N", "K"])
@triton.jit
def int4_row(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr):
    WPG: tl.constexpr = G // 8
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    t = tl.arange(0, T)
    i = tl.arange(0, WPG)
    groups = K // G
    acc = tl.zeros((BLOCK_N, T, WPG), dtype=tl.float32)
    for g0 in range(0, groups, T):
        g = g0 + t
        g_ok = g < groups
        ok = n_ok[:, None, None] & g_ok[None, :, None]
        words = tl.load(w_ptr + rn[:, None, None] * (K // 8) + g[None, :, None] * WPG + i[None, None, :], mask=ok,
                        other=0)
        part = tl.zeros((BLOCK_N, T, WPG), dtype=tl.float32)
        xs = tl.zeros((1, T, WPG), dtype=tl.float32)
        for m in tl.static_range(8):
            x = tl.load(x_ptr + g[None, :, None] * G + m * WPG + i[None, None, :], mask=g_ok[None, :, None],
                        other=0.0).to(tl.float32)
            q = (((words >> (4 * m)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            part += q * x
            xs += x
        sz = rn[:, None, None] * groups + g[None, :, None]
        s = tl.load(s_ptr + sz, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=ok, other=0.0).to(tl.float32)
        acc += part * s + xs * z
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def planar(codes: torch.Tensor, G: int) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K / 8) int32 words of the layout above."""
    N, K = codes.shape
    c = codes.view(N, K // G, 8, G // 8).to(torch.int64)
    words = sum(c[:, :, m] << (4 * m) for m in range(8))  # (N, groups, G/8)
    return (words - ((words >> 31) << 32)).to(torch.int32).reshape(N, K // 8)  # two's complement


def main() -> None:
    bw = copy_bandwidth()
    print(f"copy {bw / 1e9:.0f} GB/s")
    G = 128
    print("| shape | bf16 cuBLAS us | tinygemm us | planar Triton us | planar GB/s | vs tinygemm | rel err |")
    for name, n, k in (("qkv", 12288, 4096), ("dense", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quantize_int4(w, G)
        codes = unpack_nibbles(q["weight"])  # (N, K) 0..15
        s, z = q["scales"].to(torch.bfloat16), q["zeros"].to(torch.bfloat16)
        ref_w = ((codes.float() - 8) * s.float().repeat_interleave(G, 1) + z.float().repeat_interleave(G, 1))
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        ref = ref_w @ x.float()
        copies = max(2, int(200e6 // (n * k // 2)) + 1)
        words = [planar(codes, G) for _ in range(copies)]
        y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        it = iter(range(10**9))

        def run():
            j = next(it) % copies
            int4_row[lambda c: (triton.cdiv(n, c["BLOCK_N"]),)](x, words[j], s, z, y, n, k, G)
        run()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        packed = [torch.ops.aten._convert_weight_to_int4pack(q["weight"].contiguous(), 8) for _ in range(copies)]
        szt = torch.stack([s, z], -1).transpose(0, 1).contiguous()
        x2 = x[None]
        t_tiny = graph_time(lambda: torch.ops.aten._weight_int4pack_mm(x2, packed[next(it) % copies], G, szt))
        t_ours = graph_time(run)
        wb = [w.clone() for _ in range(max(2, int(200e6 // (2 * n * k)) + 1))]
        t_bf16 = graph_time(lambda: torch.nn.functional.linear(x2, wb[next(it) % len(wb)]))
        print(f"| {name} | {t_bf16 * 1e6:.1f} | {t_tiny * 1e6:.1f} | {t_ours * 1e6:.1f} | "
              f"{n * k / 2 / t_ours / 1e9:.0f} | {t_tiny / t_ours:.2f}x | {err:.2e} |  best {int4_row.best_config}")


if __name__ == "__main__":
    main()
