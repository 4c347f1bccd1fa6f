"""`cogvlm.quantize.int4_rows`: several-row int4 products on tinygemm's words against the dequantized weight
(Triton's CPU interpreter, every configuration of the kernel's list; on a GPU, against tinygemm itself)."""
from __future__ import annotations

import pytest
import torch

from tests.interpreter import run_interpreted


def check_products() -> None:
    from cogvlm.quantize import int4_rows, triton_mm
    from cogvlm.quantize.linear import dequantize_int4, quantize_int4, unpack_nibbles
    from cogvlm.quantize.tinygemm import tinygemm_layout

    torch.manual_seed(0)
    # (channels, inputs, rows, group): channels not a multiple of any BLOCK_N, rows not of any BLOCK_M, one tile,
    # fewer tiles than SPLIT_K, groups spanning two tiles
    for N, K, M, G in ((24, 384, 3, 128), (40, 512, 17, 256), (16, 128, 2, 128), (136, 1280, 33, 128)):
        q = quantize_int4(torch.randn(N, K) * 0.05, G)
        packed = tinygemm_layout(unpack_nibbles(q["weight"]))
        scale_zeros = torch.stack([q["scales"], q["zeros"]], dim=-1).transpose(0, 1).contiguous()
        x = torch.randn(M, K).half()  # (the interpreter's bf16 tl.dot is wrong; the GPU test covers bf16)
        want = x.float() @ dequantize_int4(q["weight"], q["scales"], q["zeros"], torch.float32).t()
        bucket = next(b for b in (2, 4, 8, 16, 32, 64) if M <= b or b == 64)
        configs = int4_rows._prune(int4_rows._int4_rows.configs, {"M_BUCKET": bucket, "K": K})
        assert configs
        for i in range(len(configs)):
            triton_mm.interpreted_config = i
            for last in (True, False):  # the K shares summed by the last to finish, or added atomically
                # (the kept counters: each call must leave them at 0 for the next)
                got = int4_rows.launch_int4_rows(x, packed, scale_zeros, G, last=last, kept=last)
                assert got.shape == (M, N) and got.dtype == torch.float16
                err = ((got.float() - want).norm() / want.norm()).item()
                assert err < 1e-3, (N, K, M, G, configs[i], last, err)  # fp16 rounding of the output: ~2e-4


def test_products_in_the_interpreter():
    run_interpreted("test_int4_rows", "check_products")


def test_only_groups_of_whole_tiles_are_supported():
    from cogvlm.quantize import int4_rows

    if int4_rows.triton is None:
        pytest.skip("Triton is not installed")
    assert int4_rows.supported(128, torch.bfloat16) and int4_rows.supported(256, torch.bfloat16)
    assert not int4_rows.supported(64, torch.bfloat16) and not int4_rows.supported(32, torch.bfloat16)
    assert not int4_rows.supported(128, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm and the compiled kernel need a CUDA GPU")
@pytest.mark.parametrize("group_size", [128, 256])
def test_on_the_gpu_the_products_match_tinygemm(group_size):
    from cogvlm.quantize import int4_rows
    from cogvlm.quantize.linear import Int4Linear

    dev = torch.device("cuda")
    linear = torch.nn.Linear(4096, 1040, bias=False).to(dev, torch.bfloat16)  # 16 | 1040 (tinygemm), 32 does not
    layer = Int4Linear.from_linear(linear, decode_path=True, group_size=group_size)
    layer.pack_for(dev, torch.bfloat16)
    assert layer.words_readable and layer.rows_kernel  # the layer routes its rows in ROWS_OWN here
    for rows in (2, 8, 26, 64):
        x = torch.randn(rows, 4096, device=dev, dtype=torch.bfloat16)
        ours = int4_rows.int4_rows(x, layer.packed, layer.scale_zeros, group_size).float()
        theirs = layer._kernel_mm(x, layer.scale_zeros).float()
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2, rows
        routed = layer.ROWS_OWN[0] <= rows <= layer.ROWS_OWN[1]
        assert torch.equal(layer(x).float(), ours) == routed, rows  # (the K shares are summed in a fixed order)
        compiled = torch.compile(lambda a: int4_rows.int4_rows(a, layer.packed, layer.scale_zeros, group_size))
        assert torch.allclose(compiled(x).float(), ours, rtol=1e-2, atol=1e-2), rows
