"""int4 products of a few rows (batched decode steps, a prompt's text rows) straight from tinygemm's words.

tinygemm (`aten._weight_int4pack_mm`) is the fastest one-row int4 product here, but it is built for one row: 0.7-0.9x
bf16 at 8 rows and 0.25-0.32x at a prompt's 26 text rows on an H200 (docs/quantize.md), and dequantizing its words
for cuBLAS (`cogvlm.quantize.tinygemm.dequantize`) writes and reads a bf16 copy of the weight, 0.31-0.35x at 26
rows. `int4_rows(x, packed, scale_zeros, group_size)` multiplies x by the packed words themselves: each program owns
BLOCK_N output channels and a share of the input tiles (split K, so that even 4096 channels fill the GPU), turns
each tile's codes into bf16 in registers and hands them to `tl.dot` against x (gathered in the layout's order) with
the output channels on the MMA's wide side, and applies the tile's scale and zero to the tile's sums, not to each
code: with one group per tile of 128 inputs (group sizes 128 and 256),

    sum_k x_k ((c_k - 8) s + z) = s * sum_k c_k x_k + (z - 8 s) * sum_k x_k.

Codes become bf16 through integer logic alone: the bits 0x4300 | c are the bf16 number 128 + c (exact, 0 <= c < 16),
so the tile's dot product is sum_k (128 + c_k) x_k and the correction's zero term takes (z - 136 s) instead (fp16:
0x6400 | c is 1024 + c). Each
K share writes its fp32 partial sums to a workspace and counts itself in (`triton_mm.counters`); the last share of
a tile to arrive adds them in order, writes the output in x's dtype and resets the count, so the result does not
depend on the order the shares finish in (atomic fp32 adds, `last=False`, are kept for the bench).

On an H200 (bench/quant_kernels.py, docs/benchmarks.md, tenth session) it is faster than tinygemm from 8 rows and
than the dequantized words up to at least 64, where `Int4Linear` uses it (`ROWS_OWN`).

The layout (from torch's int4mm.cu, checked against torch's packing by `tinygemm.layout_matches`): channel 8j + r
owns words 16r..16r+15 of tile (j, t), and nibble p of its word w = 4a + i holds input 128 t + 32 i + 2 a + 8 (p % 4)
+ p // 4.
"""
from __future__ import annotations

import torch

from .triton_mm import counters, launch, triton

K_TILE = 128  # inputs per tile of tinygemm's layout
SPLIT_MAX, BLOCK_N_MIN = 8, 32  # over the configurations below
# dtype -> (bits, value): the bits `bits | c` are the number value + c for codes 0 <= c < 16. The layers compute in
# bf16 (tinygemm's dtype); fp16 is there for Triton's CPU interpreter, whose bf16 `tl.dot` is wrong (Triton 3.9).
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def supported(group_size: int, dtype: torch.dtype) -> bool:
    """Whether `int4_rows` computes this layer: one scale and zero per tile (groups of 128 or 256), bf16 or fp16."""
    return triton is not None and group_size % K_TILE == 0 and dtype in MAGIC


if triton is not None:
    import triton.language as tl

    def _configs(rows):
        """(BLOCK_N, BLOCK_M, SPLIT_K, warps, stages, ONE_DOT) -> configs."""
        return [triton.Config({"BLOCK_N": r[0], "BLOCK_M": r[1], "SPLIT_K": r[2], "ONE_DOT": r[5]}, num_warps=r[3],
                              num_stages=r[4]) for r in rows]

    def _prune(configs, args, **_):
        """BLOCK_M no larger than the rows need (at least 16, the MMA's smallest), SPLIT_K at most the tiles."""
        m, tiles = args["M_BUCKET"], args["K"] // K_TILE
        fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m) and c.kwargs["SPLIT_K"] <= tiles]
        return fit or configs[:1]

    @triton.autotune(configs=_configs([
        (64, 16, 4, 4, 3, True), (64, 16, 8, 4, 3, True), (128, 16, 4, 4, 3, True), (128, 16, 2, 8, 3, True),
        (64, 16, 2, 4, 4, True), (128, 16, 8, 8, 3, True), (32, 16, 8, 4, 3, True), (64, 32, 4, 4, 3, True),
        (128, 32, 4, 8, 3, True), (64, 32, 8, 4, 3, True), (128, 64, 2, 8, 3, True), (64, 64, 4, 4, 3, True),
        (128, 64, 4, 8, 3, True), (64, 16, 4, 4, 3, False), (128, 16, 4, 4, 3, False), (64, 32, 4, 4, 3, False),
        (128, 32, 4, 8, 3, False), (128, 64, 2, 8, 3, False), (128, 16, 1, 4, 3, True), (128, 64, 1, 8, 3, True)]),
        key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["y_ptr", "cnt_ptr"])
    @triton.jit
    def _int4_rows(x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, M_BUCKET, G: tl.constexpr, MAGIC: tl.constexpr,
                   OFFSET: tl.constexpr, LAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   SPLIT_K: tl.constexpr, ONE_DOT: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # programs of the same channels run together
        rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok, m_ok = rn < N, rm < M
        tiles = K // 128
        first_word = (rn // 8) * tiles * 128 + (rn % 8) * 16  # channel rn's 16 words in tile 0
        w16 = tl.arange(0, 16)
        c = tl.arange(0, 128)  # the tile's codes in word order: nibble p of word w is code 8 w + p
        cw, cp = c // 8, c % 8
        k_of_c = 32 * (cw % 4) + 2 * (cw // 4) + 8 * (cp % 4) + cp // 4  # the input each code multiplies
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
        per_split = tl.cdiv(tiles, SPLIT_K)
        for i in range(0, per_split):  # (bounds of K alone: Triton 3.6's interpreter loops over no program id)
            t = tl.program_id(1) * per_split + i
            here = (t + tl.zeros((1,), tl.int32)) < tiles  # (fewer tiles in the last share: load none, add 0)
            words = tl.load(w_ptr + first_word[:, None] + t * 128 + w16[None, :], mask=n_ok[:, None] & here, other=0)
            if ONE_DOT:  # the tile's 128 codes side by side, one product
                words = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, 16, 8)), (BLOCK_N, 128))
                codes = (((words >> (4 * cp[None, :])) & 15) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
                xt = tl.load(x_ptr + rm[None, :] * K + (t * 128 + k_of_c)[:, None], mask=m_ok[None, :] & here,
                             other=0.0)
                part = tl.dot(codes, xt)  # sum_k (OFFSET + c_k) x_k: (BLOCK_N, BLOCK_M)
                x_sum = tl.sum(xt.to(tl.float32), axis=0)
            else:  # nibble p of every word: 16 codes, each against its x column, eight products
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for p in tl.static_range(8):
                    codes = (((words >> (4 * p)) & 15) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
                    k = t * 128 + 32 * (w16 % 4) + 2 * (w16 // 4) + 8 * (p % 4) + p // 4
                    xt = tl.load(x_ptr + rm[None, :] * K + k[:, None], mask=m_ok[None, :] & here, other=0.0)
                    part = tl.dot(codes, xt, part)
                    x_sum += tl.sum(xt.to(tl.float32), axis=0)
            sz = sz_ptr + ((t * 128 // G) * N + rn) * 2
            s = tl.load(sz, mask=n_ok & here, other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=n_ok & here, other=0.0).to(tl.float32)
            acc += part * s[:, None] + (z - (OFFSET + 8.0) * s)[:, None] * x_sum[None, :]
        out, ok = rm[None, :] * N + rn[:, None], m_ok[None, :] & n_ok[:, None]
        if not LAST:  # every share added into the fp32 output
            tl.atomic_add(y_ptr + out, acc, mask=ok, sem="relaxed")
        elif SPLIT_K == 1:
            tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok)
        else:  # each share to the workspace; the last of a tile's shares to arrive sums them, in order
            tl.store(ws_ptr + tl.program_id(1) * M * N + out, acc, mask=ok)
            tl.debug_barrier()  # (every thread's stores issued before the count that publishes them)
            tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
            if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for share in range(SPLIT_K):
                    total += tl.load(ws_ptr + share * M * N + out, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next call


def launch_int4_rows(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int,
                     wrap=lambda k: k, last: bool = True, kept: bool = False) -> torch.Tensor:
    """(M, K) @ the packed (N, K) weight .T -> (M, N) in x's dtype (bf16 or fp16); `scale_zeros` (K / G, N, 2) as
    tinygemm takes it. last: the K shares summed by the last to finish (else added atomically in fp32, then cast);
    kept: its counters from `triton_mm.counters` (no fill kernel per call) rather than made per call."""
    (M, K), N = x.shape, scale_zeros.shape[1]
    if last:
        y = x.new_empty(M, N)
        ws = torch.empty(SPLIT_MAX * M * N, dtype=torch.float32, device=x.device)
        n = triton.cdiv(N, BLOCK_N_MIN) * triton.cdiv(M, 16)
        cnt = counters(x.device, n, "int4_rows") if kept else torch.zeros(n, dtype=torch.int32, device=x.device)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
        ws = cnt = y  # (not read)
    grid = lambda c: (triton.cdiv(N, c["BLOCK_N"]), c["SPLIT_K"], triton.cdiv(M, c["BLOCK_M"]))  # noqa: E731
    bucket = next(b for b in (2, 4, 8, 16, 32, 64) if M <= b or b == 64)  # (comparisons only: M may be symbolic)
    magic, offset = MAGIC[x.dtype]
    launch(_int4_rows, grid, wrap, x, packed, scale_zeros, y, ws, cnt, M, N, K, bucket, group_size, magic, offset,
           last)
    return y if last else y.to(x.dtype)


_OPS = triton is not None and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
if _OPS:
    @torch.library.triton_op("cogvlm::int4_rows", mutates_args=())
    def _int4_rows_op(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor:
        return launch_int4_rows(x, packed, scale_zeros, group_size, torch.library.wrap_triton)


def int4_rows(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """What `Int4Linear` calls: the custom op inside compiled code, a plain launch otherwise (as `triton_mm`)."""
    if torch.compiler.is_compiling():
        return torch.ops.cogvlm.int4_rows(x, packed, scale_zeros, group_size)
    return launch_int4_rows(x, packed, scale_zeros, group_size, kept=True)
