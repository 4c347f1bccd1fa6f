"""The batch-1 decode step's int4 product (`cogvlm.fast_decode`): one row times tinygemm's words, with the options of
`decode_kernels.gemv` (RMSNorm of x on the fly, the SwiGLU gate, the residual add), so that an int4 layer keeps the
step's seven kernels instead of running through its module (tinygemm, plus a norm kernel and a gate kernel).

The layout is tinygemm's, as `Int4Linear` holds it on CUDA (`cogvlm.quantize.int4_rows`): channel 8j + r owns words
16r..16r+15 of tile (j, t), 128 inputs a tile, and nibble p of its word w = 4a + i holds input
128 t + 32 i + 2 a + 8 (p % 4) + p // 4. One scale s and zero z per channel and tile (groups of 128 or 256 inputs):
the weight is (c - 8) s + z for code c.

Each program owns BLOCK_N channels and walks the inputs TILES tiles at a time, reading a (BLOCK_N, TILES, 16) block
of words. A thread then holds the same words of several channels, so each input it loads serves all of them (a
first version with one channel per thread loaded an input per code and read 9-30 % of copy bandwidth on an H200).
Codes become floats by integer logic alone (`_nibbles_to_f32`: f = 1 + c / 128, exact), and a tile's sums take the
scale and zero once:

    sum_k x_k ((c_k - 8) s + z) = 128 s sum_k f_k x_k + (z - 136 s) sum_k x_k.

Each tile's inputs are read once as 128 contiguous values and put in nibble order in registers (`_inputs`). For
the short loops' latency, SPLIT shares a channel block's tiles out over several programs, each writing its sums to a
workspace, the last of them to arrive adding them in order and finishing (`triton_mm.counters`, as `int4_rows`). Measured on an H200
(docs/benchmarks.md, 2026-12-04): in the configurations of `MEASURED` (three of them split in four) 1.31-2.07 TB/s
at the four decoder shapes, against tinygemm's 1.26-1.83 (which has no norm, gate or residual); the int4 g128 step
2388 us against bf16's 3828. Not faster there, and removed: two blocks of words in flight instead of one (AHEAD,
until 2026-12-04) and inputs loaded in nibble order (GATHER); nor were the splits of `CANDIDATES`. The loop spends ~4.1 sm_90 instructions a code
(Triton 3.9: a byte permute and a multiply-add each, the rest addresses, reductions and layout shuffles).

It runs in Triton's CPU interpreter too (tests), without PDL and with shifts and masks for the byte permutes.
"""
from __future__ import annotations

import functools
import os

import torch

from .quantize.triton_mm import INTERPRETED, counters, launch, triton

K_TILE = 128  # inputs per tile of tinygemm's layout
PDL = os.environ.get("COGVLM_INT4_PDL", "1") != "0"  # launched with programmatic dependent launch (as the others)

if triton is not None:
    import triton.language as tl

    from .decode_kernels import _finish, _wait_for_inputs

    _INTERPRETED = tl.constexpr(INTERPRETED)

    @triton.jit
    def _nibbles_to_f32(words):
        """The low nibble c of each byte k of int32 words as the float 1 + c / 128 (exact), four float32 tensors:
        the nibbles or-ed with 0x80 (one logic operation for four), then each byte moved under the exponent bits
        0x3F by a byte permute (`prmt`): the bits 0x3F800000 | c << 16."""
        if _INTERPRETED:
            t = (words & 0x0F0F0F0F) | -2139062144  # | 0x80808080, as int32
            f0 = ((t & 0xFF) << 16) | 0x3F000000
            f1 = (((t >> 8) & 0xFF) << 16) | 0x3F000000
            f2 = (((t >> 16) & 0xFF) << 16) | 0x3F000000
            f3 = (((t >> 24) & 0xFF) << 16) | 0x3F000000
        else:
            # prmt d, a, b, sel: byte i of d is byte (nibble i of sel) of [a | b]; with b = 0x3F, byte 4 is 0x3F and
            # byte 5 zero: d = [0, 0, byte k of a, 0x3F] from the low byte up, selector 0x4k55
            f0, f1, f2, f3 = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $4, 0x0F0F0F0F, 0x80808080, 0xEA; prmt.b32 $0, t, 0x3F, 0x4055;"
                " prmt.b32 $1, t, 0x3F, 0x4155; prmt.b32 $2, t, 0x3F, 0x4255; prmt.b32 $3, t, 0x3F, 0x4355; }",
                "=r,=r,=r,=r,r", [words], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        return (f0.to(tl.float32, bitcast=True), f1.to(tl.float32, bitcast=True), f2.to(tl.float32, bitcast=True),
                f3.to(tl.float32, bitcast=True))

    @triton.jit
    def _block(w_ptr, offsets, n_ok, t, tiles, GATE: tl.constexpr, UP):
        """The (BLOCK_N, TILES, 16) words of the tiles t (and of the up channels, UP words further, with GATE)."""
        ok = n_ok[:, None, None] & (t < tiles)[None, :, None]
        w = tl.load(w_ptr + offsets, mask=ok, other=0)
        u = tl.load(w_ptr + UP + offsets, mask=ok, other=0) if GATE else w
        return w, u

    @triton.jit
    def _inputs(x_ptr, nw_ptr, t, tiles, NORM: tl.constexpr, TILES: tl.constexpr):
        """The inputs of the tiles t in nibble order, read once as (TILES, 128) and put in place in registers: eight
        (TILES, 16) tensors, the inputs that nibble p of each word multiplies (times the norm's weight with NORM),
        with their sum of squares."""
        k = (t * 128)[:, None] + tl.arange(0, 128)[None, :]
        ok = (t < tiles)[:, None] & (k >= 0)
        x = tl.load(x_ptr + k, mask=ok, other=0.0).to(tl.float32)
        squares = tl.sum(x * x, axis=1)
        if NORM:
            x *= tl.load(nw_ptr + k, mask=ok, other=0.0).to(tl.float32)
        # input 32 i + 8 q + 2 a + b of a tile is nibble p = 4 b + q of word w = 4 a + i
        x = tl.permute(tl.reshape(x, (TILES, 4, 4, 4, 2)), (0, 3, 1, 4, 2))  # (TILES, a, i, b, q)
        x = tl.reshape(x, (TILES, 16, 2, 2, 2))  # (TILES, w, b, q // 2, q % 2)
        e, o = tl.split(x)  # q even, odd
        e0, e1 = tl.split(e)
        o0, o1 = tl.split(o)
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return x0, x1, x2, x3, x4, x5, x6, x7, squares

    @triton.jit
    def _tile_sums(acc, x_sum, sz_ptr, rn, n_ok, t, tiles, NS, G: tl.constexpr):
        """(BLOCK_N,) the block's share of the products: each tile's code sums with its channel's scale and zero."""
        sz = sz_ptr + (((t * 128) // G)[None, :] * NS + rn[:, None]) * 2  # (BLOCK_N, TILES)
        ok = n_ok[:, None] & (t < tiles)[None, :]
        s = tl.load(sz, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(sz + 1, mask=ok, other=0.0).to(tl.float32)
        return tl.sum(128.0 * s * tl.sum(acc, axis=2) + (z - 136.0 * s) * x_sum[None, :], axis=1)

    def _configs(rows):
        """(BLOCK_N, TILES, warps[, SPLIT]) -> configs; SPLIT: programs a channel block's inputs are shared out over."""
        return [triton.Config({"BLOCK_N": r[0], "TILES": r[1], "SPLIT": r[3] if len(r) > 3 else 1}, num_warps=r[2],
                              num_stages=1) for r in rows]

    # More split configurations, timed by bench/gemv_configs.py (--extra-only) against the list's picks: none faster
    # by 3 % on an H200 (2026-12-04); the interpreter test runs them too
    CANDIDATES = _configs([(32, 4, 2, 2), (32, 8, 8, 2), (8, 2, 1, 2), (32, 8, 8, 4), (64, 4, 8, 2), (8, 4, 2, 4),
                           (16, 4, 2, 2)])

    # (32, 4, 2) ... (16, 2, 1, 4): MEASURED's (below) and the next; the last two split a block's tiles in four
    # (measured on an H200, 2026-12-04: dense and down 8 and 22 % faster than unsplit, gate_up 3 %)
    @triton.autotune(configs=_configs([(8, 8, 2), (16, 8, 2), (16, 8, 4), (32, 8, 4), (16, 4, 2), (32, 4, 4),
                                       (8, 4, 1), (16, 2, 2), (32, 2, 2), (64, 4, 8), (8, 16, 4), (16, 16, 4),
                                       (32, 4, 2), (32, 8, 8), (8, 2, 1), (64, 8, 8), (32, 4, 4, 4),
                                       (16, 2, 1, 4)]),
                     key=["N", "K", "NORM", "GATE", "RESIDUAL"])
    @triton.jit
    def _int4_gemv(x_ptr, w_ptr, sz_ptr, nw_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, NS, eps, G: tl.constexpr,
                   NORM: tl.constexpr, GATE: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                   BLOCK_N: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels (of the gate half with GATE)
        n_ok = rn < N
        tiles = K // 128
        per = tl.cdiv(tl.cdiv(tiles, SPLIT), TILES) * TILES  # tiles a share (SPLIT: this program's is program_id 1)
        first = tl.program_id(1) * per
        end = tl.minimum(tiles, first + per)  # (its tiles: first .. end - 1)
        w16, tt = tl.arange(0, 16), first + tl.arange(0, TILES)
        offsets = ((rn // 8) * tiles * 128 + (rn % 8) * 16)[:, None, None] + (tt * 128)[None, :, None] + w16[None,
                                                                                                            None, :]
        up = (N // 8) * tiles * 128  # the up channels' words (GATE: N % 8 == 0)
        # The weights do not depend on the previous kernel: the first block is read before waiting for it (PDL);
        # each step then asks for the next block before its arithmetic.
        w, u = _block(w_ptr, offsets, n_ok, tt, end, GATE, up)
        _wait_for_inputs(PDL)
        y = tl.zeros((BLOCK_N,), dtype=tl.float32)
        y_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        squares = tl.zeros((TILES,), dtype=tl.float32)
        for i in range(0, per, TILES):
            t = tt + i
            w_next, u_next = _block(w_ptr, offsets + (i + TILES) * 128, n_ok, t + TILES, end, GATE, up)
            even, odd = _nibbles_to_f32(w), _nibbles_to_f32(w >> 4)  # nibbles 0, 2, 4, 6 and 1, 3, 5, 7
            if GATE:
                even_up, odd_up = _nibbles_to_f32(u), _nibbles_to_f32(u >> 4)
            acc = tl.zeros((BLOCK_N, TILES, 16), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, TILES, 16), dtype=tl.float32)
            xs = _inputs(x_ptr, nw_ptr, t, end, NORM, TILES)
            if NORM:
                squares += xs[8]
            x_sum = tl.zeros((TILES, 16), dtype=tl.float32)
            for p in tl.static_range(8):
                x = xs[p]
                x_sum += x
                acc += (even[p // 2] if p % 2 == 0 else odd[p // 2]) * x[None, :, :]
                if GATE:
                    acc_up += (even_up[p // 2] if p % 2 == 0 else odd_up[p // 2]) * x[None, :, :]
            x_tiles = tl.sum(x_sum, axis=1)
            y += _tile_sums(acc, x_tiles, sz_ptr, rn, n_ok, t, end, NS, G)
            if GATE:
                y_up += _tile_sums(acc_up, x_tiles, sz_ptr, rn + N, n_ok, t, end, NS, G)
            w, u = w_next, u_next
        squares = tl.sum(squares, axis=0)
        if SPLIT == 1:
            _finish(y, y_up, squares, x_ptr, r_ptr, y_ptr, rn, n_ok, K, eps, NORM, GATE, RESIDUAL)
        else:  # each share's sums to the workspace; the last share of the block to arrive adds them, in order
            share, block = tl.program_id(1), tl.program_id(0)
            tl.store(ws_ptr + (share * 2) * N + rn, y, mask=n_ok)
            tl.store(ws_ptr + (share * 2 + 1) * N + rn, y_up, mask=n_ok)
            tl.store(ws_ptr + 2 * SPLIT * N + share * tl.num_programs(0) + block, squares)
            tl.debug_barrier()  # (every thread's stores issued before the count that publishes them)
            if tl.atomic_add(cnt_ptr + block, 1, sem="acq_rel") == SPLIT - 1:
                y = tl.zeros((BLOCK_N,), dtype=tl.float32)
                y_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
                squares = 0.0
                for j in range(SPLIT):
                    y += tl.load(ws_ptr + (j * 2) * N + rn, mask=n_ok, other=0.0, cache_modifier=".cg")
                    y_up += tl.load(ws_ptr + (j * 2 + 1) * N + rn, mask=n_ok, other=0.0, cache_modifier=".cg")
                    squares += tl.load(ws_ptr + 2 * SPLIT * N + j * tl.num_programs(0) + block, cache_modifier=".cg")
                _finish(y, y_up, squares, x_ptr, r_ptr, y_ptr, rn, n_ok, K, eps, NORM, GATE, RESIDUAL)
                tl.atomic_xchg(cnt_ptr + block, 0)  # ready for the next call

    LISTED_SPLIT = max(c.kwargs["SPLIT"] for c in _int4_gemv.configs)  # what the autotuned launch may need


# Configurations measured faster than the autotuner's pick, per GPU and (N, K, NORM, GATE, RESIDUAL): as
# `decode_kernels.MEASURED`, from bench/gemv_configs.py --dtypes int4 on an H200 (docs/benchmarks.md, 2026-12-04,
# fifteenth and sixteenth sessions): qkv, dense, gate_up, down 1756, 1305, 2066, 1676 GB/s (tinygemm: 1690, 1258,
# 1833, 1585).
MEASURED = {"NVIDIA H200": {(12288, 4096, True, False, False): (32, 4, 2),
                            (4096, 4096, False, False, True): (32, 4, 4, 4),
                            (11008, 4096, True, True, False): (16, 2, 1, 4),
                            (4096, 11008, False, False, True): (32, 4, 4, 4)}}


@functools.lru_cache(maxsize=None)
def measured_configs(device: torch.device) -> dict:
    """This GPU's entries of MEASURED as `triton.Config`s ({} elsewhere, or with COGVLM_GEMV_MEASURED=0)."""
    from .decode_kernels import measured_entries

    return measured_entries(device, MEASURED, _configs)


def supported(packed: torch.Tensor, scale_zeros: torch.Tensor, K: int, gate: bool = False) -> bool:
    """Whether `gemv4` reads this layer: tinygemm's words (int32) with one scale and zero per tile, and with gate
    [gate | up] halves of whole groups of 8 channels."""
    N = scale_zeros.shape[1]
    return (triton is not None and packed.dtype == torch.int32 and K % K_TILE == 0
            and (K // scale_zeros.shape[0]) % K_TILE == 0 and not (gate and N % 16))


def gemv4(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, norm=None, gate: bool = False,
          residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, config=None) -> torch.Tensor:
    """(K,) x times the int4 (N, K) weight in tinygemm's words `packed`, `scale_zeros` (K / G, N, 2) -> (N,) y, with
    the options of `decode_kernels.gemv` (norm, gate, residual); config: a `triton.Config` instead of the autotuned
    one."""
    from .decode_kernels import launch_options

    K = x.shape[-1]
    NS = scale_zeros.shape[1]
    N = NS // 2 if gate else NS
    dtype = residual.dtype if residual is not None else out_dtype or scale_zeros.dtype
    y = torch.empty(N, dtype=dtype, device=x.device)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    if config is None:
        config = measured_configs(x.device).get((N, K, norm is not None, gate, residual is not None))
    # a workspace and counters only where a share of the inputs may be split off (SPLIT > 1: the given
    # configuration's, else the autotuning list's largest)
    split = config.kwargs["SPLIT"] if config is not None else LISTED_SPLIT
    blocks = triton.cdiv(N, 4)  # (the most channel blocks a configuration makes: BLOCK_N >= 4)
    ws, cnt = ((torch.empty(split * (2 * N + blocks), dtype=torch.float32, device=x.device),
                counters(x.device, blocks, "decode_int4")) if split > 1 else (y, y))
    args = (x, packed, scale_zeros, norm_weight, residual if residual is not None else y, y, ws, cnt, N, K, NS, eps,
            K // scale_zeros.shape[0], norm is not None, gate, residual is not None)
    grid = lambda c: (triton.cdiv(N, c["BLOCK_N"]), c["SPLIT"])  # noqa: E731
    options = launch_options(x.device) if PDL else {"PDL": False}
    if config is None:
        launch(_int4_gemv, grid, lambda k: k, *args, **options)
    else:
        _int4_gemv.fn[grid(config.kwargs)](*args, **config.all_kwargs(), **options)
    return y


__all__ = ["gemv4", "supported"]
