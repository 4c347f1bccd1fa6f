"""tinygemm's int4 weight layout, read back: the weight of a layer packed for tinygemm, dequantized for products of
many rows, so one copy of the weight serves every row count.

The int4 decode layers are packed for tinygemm (`aten._weight_int4pack_mm`), the fastest one-row int4 product here
(1.5-2.0x bf16 on an H200). But tinygemm is built for one row: measured on an H200 (bench/quant_kernels.py,
docs/quantize.md) it runs at 0.7-0.9x bf16 at 8 rows, 0.25-0.32x at a prompt's 26 text rows and 0.04x at the 832
text rows of a caption batch of 32. From 8 to 64 rows `cogvlm.quantize.int4_rows` multiplies the words themselves;
beyond, the layer instead writes its weight in
the compute dtype from the packed words (`dequantize(packed, scale_zeros, group_size, dtype)`, one pass,
`(code - 8) * scale + zero` in fp32 rounded once, as `dequantize_int4`) and runs cuBLAS on it: 0.31-0.35x bf16 at 26
rows, 0.41-0.45x at 256, 0.69-0.71x at 832.

tinygemm's layout (`aten._convert_weight_to_int4pack` on CUDA with 8 inner k-tiles, as `Int4Linear` packs it;
read from torch's int4mm.cu): int32 words of shape (N / 8, K / 128, 32, 4). The tile of channel block j and input
block t holds channels 8j..8j+7 and inputs 128t..128t+127 in 128 words; channel 8j + r owns words 16r..16r+15 of it,
and nibble p (bits 4p..4p+3) of its word w = 4a + i holds input

    k = 128 t + 32 i + 2 a + 8 (p % 4) + p // 4

(the MMA's thread 4r + a owns words 4a..4a+3; 4 bits a code, codes 0..15). `tinygemm_layout` builds those words
from codes with torch ops; on a GPU `layout_matches` checks torch's own packing against it once, and the layers
keep tinygemm for every row count if a torch build ever packs differently.

Tried on the H200 and dropped: a several-row product on these words in Triton (`tl.dot` on codes converted in
registers against x gathered in the layout's order), 0.2-0.75x bf16 at 2-64 rows, slower than tinygemm up to ~26
rows and than dequantizing beyond; and this dequantization in programs of 8 tiles with one scale load a tile,
slower (qkv at 26 rows, with its GEMM: 112.5 against 86.6 us).
"""
from __future__ import annotations

import torch

from .triton_mm import triton

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
        codes = torch.randint(0, 16, (16, 2 * K_TILE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        nibbles = (codes[:, ::2] << 4) | codes[:, 1::2]  # the stored format: the even input in the high nibble
        theirs = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), INNER_K_TILES)
        _matches[key] = bool(torch.equal(theirs.cpu(), tinygemm_layout(codes)))
    return _matches[key]


if triton is not None:
    import triton.language as tl

    from .triton_mm import _nibble_minus_8

    @triton.jit
    def _dequantize(w_ptr, sz_ptr, out_ptr, N, K, G: tl.constexpr, BLOCK: tl.constexpr):
        """Row n, a block of inputs k per program, in the output's order: each code's word and nibble by the layout."""
        n = tl.program_id(0)
        k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = k < K
        t, kk = k // 128, k % 128
        rest = (kk % 32) // 2  # = a + 4 (p % 4)
        word = ((n // 8) * (K // 128) + t) * 128 + (n % 8) * 16 + 4 * (rest % 4) + kk // 32
        words = tl.load(w_ptr + word, mask=ok, other=0)
        sz = sz_ptr + ((k // G) * N + n) * 2
        s = tl.load(sz, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(sz + 1, mask=ok, other=0.0).to(tl.float32)
        w = _nibble_minus_8(words, 4 * (4 * (kk % 2) + rest // 4)) * s + z
        tl.store(out_ptr + n.to(tl.int64) * K + k, w.to(out_ptr.dtype.element_ty), mask=ok)


def launch_dequantize(packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, dtype: torch.dtype,
                      wrap=lambda k: k) -> torch.Tensor:
    """The (N, K) weight in `dtype` from tinygemm's words and its (K / G, N, 2) scales and zeros."""
    N, K = scale_zeros.shape[1], scale_zeros.shape[0] * group_size
    out = torch.empty(N, K, dtype=dtype, device=packed.device)
    wrap(_dequantize)[(N, triton.cdiv(K, 1024))](packed, scale_zeros, out, N, K, group_size, BLOCK=1024)
    return out


_OPS = triton is not None and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
if _OPS:
    @torch.library.triton_op("cogvlm::tinygemm_dequantize", mutates_args=())
    def _dequantize_op(packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
        return launch_dequantize(packed, scale_zeros, group_size, dtype, torch.library.wrap_triton)


def dequantize(packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """What `Int4Linear` calls: the custom op inside compiled code, a plain launch otherwise (as `triton_mm`)."""
    if torch.compiler.is_compiling():
        return torch.ops.cogvlm.tinygemm_dequantize(packed, scale_zeros, group_size, dtype)
    return launch_dequantize(packed, scale_zeros, group_size, dtype)
