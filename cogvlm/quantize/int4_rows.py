"""int4 products of several rows on tinygemm's own weight layout, so one copy of the weight serves every row count.

The int4 decode layers are packed for tinygemm (`aten._weight_int4pack_mm`), the fastest one-row int4 product here.
But tinygemm is built for one row: at 8 rows it runs at 0.7-0.9x bf16's speed and at the prompt's ~26 text rows at
0.23-0.27x (docs/quantize.md), which made int4's batched decode slower than bf16 and cost ~12 ms of its first token.
`int4_rows(x, packed, scale_zeros, group_size)` reads the same packed words for 2+ rows: each program converts a
tile of codes to the compute dtype in registers (`(code - 8) * scale + zero`, in fp32, rounded once, as tinygemm
and `dequantize_int4` do) and multiplies it with `tl.dot`, programs that share a weight tile running together.

tinygemm's layout (`aten._convert_weight_to_int4pack` on CUDA with 8 inner k-tiles, as `Int4Linear` packs it;
read from torch's int4mm.cu): int32 words of shape (N / 8, K / 128, 32, 4). The tile of channel block j and input
block t holds channels 8j..8j+7 and inputs 128t..128t+127 in 128 words; channel 8j + r owns words 16r..16r+15 of it,
and nibble p (bits 4p..4p+3) of its word w = 4a + i holds input

    k = 128 t + 32 i + 2 a + 8 (p % 4) + p // 4

(the MMA's thread 4r + a owns words 4a..4a+3; 4 bits a code, codes 0..15). `tinygemm_layout` builds those words
from codes with torch ops; on a GPU `layout_matches` checks torch's own packing against it once, and the layers
fall back to tinygemm for every row count if a torch build ever packs differently.
"""
from __future__ import annotations

import torch

from .triton_mm import launch, triton

K_TILE = 128  # inputs per tile (8 inner k-tiles of 16)
INNER_K_TILES = 8
_matches: dict[str, bool] = {}


def tinygemm_layout(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 (N % 8 == 0, K % 128 == 0) -> tinygemm's int32 words (N / 8, K / 128, 32, 4)."""
    N, K = codes.shape
    w, p = torch.arange(16).view(16, 1), torch.arange(8).view(1, 8)
    k = 32 * (w % 4) + 2 * (w // 4) + 8 * (p % 4) + p // 4  # (16 words, 8 nibbles) -> input within the tile
    tiles = codes.view(N // 8, 8, K // K_TILE, K_TILE).transpose(1, 2)  # (j, t, r, input)
    nibbles = tiles[..., k.flatten().to(codes.device)].view(N // 8, K // K_TILE, 8, 16, 8).to(torch.int64)
    words = (nibbles << (4 * p.to(codes.device))).sum(-1)  # (j, t, r, w): 32 bits in an int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # as int32's two's complement
    return words.view(N // 8, K // K_TILE, 32, 4).to(torch.int32)


def layout_matches(device: torch.device) -> bool:
    """Whether torch's CUDA packing on `device` gives `tinygemm_layout`'s words (checked once per device kind)."""
    key = str(torch.device(device))
    if key not in _matches:
        from .linear import pack_nibbles

        codes = torch.randint(0, 16, (16, 2 * K_TILE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        theirs = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(codes).to(device), INNER_K_TILES)
        _matches[key] = bool(torch.equal(theirs.cpu(), tinygemm_layout(codes)))
    return _matches[key]


if triton is not None:
    import triton.language as tl

    from .triton_mm import _nibble_minus_8

    def _rows_configs(rows):
        """(BLOCK_N, BLOCK_M, warps, stages, ONE_DOT) -> configs."""
        return [triton.Config({"BLOCK_N": r[0], "BLOCK_M": r[1], "ONE_DOT": r[4]}, num_warps=r[2], num_stages=r[3])
                for r in rows]

    @triton.autotune(configs=_rows_configs([
        (64, 16, 4, 3, False), (128, 16, 4, 3, False), (128, 16, 8, 3, False), (32, 16, 4, 3, False),
        (64, 32, 4, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 3, False),
        (64, 16, 4, 3, True), (128, 16, 8, 3, True), (64, 32, 4, 3, True), (128, 64, 8, 3, True),
        (128, 128, 8, 3, True)]), key=["M_BUCKET", "N", "K", "G"])
    @triton.jit
    def _int4_rows(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, M_BUCKET, G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ONE_DOT: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # programs with the same weight tile run together
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        first_word = (rn // 8) * (K // 128) * 128 + (rn % 8) * 16  # channel rn's 16 words in tile 0
        w = tl.arange(0, 16)  # word w = 4a + i
        a, i = w // 4, w % 4
        c = tl.arange(0, 128)  # ONE_DOT: the tile's codes in word order, nibble p of word w is code 8w + p
        cw, cp = c // 8, c % 8
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
        for t in range(0, K // 128):
            words = tl.load(w_ptr + first_word[:, None] + t * 128 + w[None, :], mask=n_ok[:, None], other=0)
            if G >= 128:  # one group for the whole tile
                sz = sz_ptr + ((t * 128 // G) * N + rn[:, None]) * 2
            elif ONE_DOT:  # word 4a + i holds inputs 32i..32i+31 of the tile
                sz = sz_ptr + (((t * 128 + 32 * (cw[None, :] % 4)) // G) * N + rn[:, None]) * 2
            else:
                sz = sz_ptr + (((t * 128 + 32 * i[None, :]) // G) * N + rn[:, None]) * 2
            s = tl.load(sz, mask=n_ok[:, None], other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=n_ok[:, None], other=0.0).to(tl.float32)
            if ONE_DOT:  # the 128 codes side by side, one product
                codes = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, 16, 8)), (BLOCK_N, 128))
                wt = (_nibble_minus_8(codes, 4 * cp[None, :]) * s + z).to(x_ptr.dtype.element_ty)
                k = t * 128 + 32 * (cw % 4) + 2 * (cw // 4) + 8 * (cp % 4) + cp // 4
                xt = tl.load(x_ptr + rm[None, :] * K + k[:, None], mask=m_ok[None, :], other=0.0)  # (128, BLOCK_M)
                acc = tl.dot(wt, xt, acc)
            else:
                for p in tl.static_range(8):  # nibble p of every word: 16 inputs, each against its x column
                    wt = (_nibble_minus_8(words, 4 * p) * s + z).to(x_ptr.dtype.element_ty)  # (BLOCK_N, 16)
                    k = t * 128 + 32 * i + 2 * a + 8 * (p % 4) + p // 4
                    xt = tl.load(x_ptr + rm[None, :] * K + k[:, None], mask=m_ok[None, :], other=0.0)
                    acc = tl.dot(wt, xt, acc)
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[None, :] & n_ok[:, None])


def launch_int4_rows(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int,
                     wrap=lambda k: k) -> torch.Tensor:
    """(M, K) @ the packed (N, K) weight .T -> (M, N) in x's dtype; `scale_zeros` (K / G, N, 2) as tinygemm takes it."""
    (M, K), N = x.shape, scale_zeros.shape[1]
    y = x.new_empty(M, N)
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))  # noqa: E731
    bucket = next(b for b in (2, 4, 8, 16, 32, 64, 128, 256, 512) if M <= b or b == 512)  # (comparisons only)
    launch(_int4_rows, grid, wrap, x, packed, scale_zeros, y, M, N, K, bucket, group_size)
    return y


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
    return launch_int4_rows(x, packed, scale_zeros, group_size)
