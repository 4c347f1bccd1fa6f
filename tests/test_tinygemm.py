"""`cogvlm.quantize.tinygemm`: tinygemm's int4 layout as read from torch's int4mm.cu, and the weight dequantized from
it against `dequantize_int4` (Triton's CPU interpreter; on a GPU, torch's packing and the layer's products against
tinygemm's)."""
from __future__ import annotations

import pytest
import torch

from cogvlm.quantize.tinygemm import tinygemm_layout
from tests.interpreter import run_interpreted


def _word(nibbles):
    value = sum(v << (4 * p) for p, v in enumerate(nibbles))
    return value - (1 << 32) if value >= 1 << 31 else value


def test_the_layout_puts_codes_where_tinygemm_reads_them():
    # int4mm.cu: channel 8j + r, tile t: thread 4r + a's word i holds the bytes 16i + a + {0, 4, 8, 12} of the
    # tile's 64 (two codes each, the even input in the high nibble): their high nibbles in bits 0-15, then the low
    N, K = 16, 256
    k = torch.arange(K)
    codes = ((k[None, :] + 3 * torch.arange(N)[:, None]) % 16).to(torch.uint8)  # code of (n, k): (k + 3n) % 16
    words = tinygemm_layout(codes)
    assert words.shape == (N // 8, K // 128, 32, 4) and words.dtype == torch.int32

    def expect(n, t, a, i):
        ks = [128 * t + 2 * (16 * i + a + 4 * j) for j in range(4)]
        return _word([(kk + 3 * n) % 16 for kk in ks] + [(kk + 1 + 3 * n) % 16 for kk in ks])

    cases = [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 3, 2), (5, 0, 1, 3), (7, 1, 2, 0), (9, 1, 3, 3), (15, 0, 0, 0)]
    for n, t, a, i in cases:
        r = n % 8
        assert words[n // 8, t, 4 * r + a, i].item() == expect(n, t, a, i), (n, t, a, i)


def check_dequantize() -> None:
    from cogvlm.quantize import tinygemm
    from cogvlm.quantize.linear import dequantize_int4, quantize_int4, unpack_nibbles

    torch.manual_seed(0)
    N, K = 24, 384  # not multiples of the kernel's block of 1024 elements: a partial block
    w = torch.randn(N, K) * 0.05
    for G in (32, 64, 128):
        q = quantize_int4(w, G)
        packed = tinygemm_layout(unpack_nibbles(q["weight"]))
        scale_zeros = torch.stack([q["scales"], q["zeros"]], dim=-1).transpose(0, 1).contiguous()
        want = dequantize_int4(q["weight"], q["scales"], q["zeros"], torch.float32)
        for dtype in (torch.float32, torch.bfloat16):  # (the interpreter rounds bf16 by truncation)
            got = tinygemm.launch_dequantize(packed, scale_zeros, G, dtype)
            assert got.shape == (N, K) and got.dtype == dtype
            bound = want.abs() * (torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6) + 1e-7
            assert ((got.float() - want).abs() <= bound).all(), (G, dtype)


def test_the_weight_dequantized_from_the_words_in_the_interpreter():
    run_interpreted("test_tinygemm", "check_dequantize")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm's packing and kernel need a CUDA GPU")
@pytest.mark.parametrize("group_size", [32, 128])
def test_on_the_gpu_torchs_packing_and_tinygemm_agree(group_size):
    from cogvlm.quantize.linear import Int4Linear, dequantize_int4
    from cogvlm.quantize.tinygemm import layout_matches

    dev = torch.device("cuda")
    assert layout_matches(dev)
    linear = torch.nn.Linear(4096, 1024, bias=False).to(dev, torch.bfloat16)
    layer = Int4Linear.from_linear(linear, decode_path=True, group_size=group_size)
    plain = dequantize_int4(layer.weight, layer.scales, layer.zeros, torch.bfloat16)
    layer.pack_for(dev, torch.bfloat16)
    assert layer.kernel == "cuda" and layer.words_readable
    assert torch.equal(layer.dequantize(torch.bfloat16), plain)  # from the words
    for rows in (1, 8, Int4Linear.ROWS_TINYGEMM + 1, 26, 300):  # tinygemm, then the dequantized weight
        x = torch.randn(rows, 4096, device=dev, dtype=torch.bfloat16)
        ours = layer(x).float()
        theirs = layer._kernel_mm(x, layer.scale_zeros).float()
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2, rows
