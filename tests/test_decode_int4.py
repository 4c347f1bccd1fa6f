"""`cogvlm.decode_int4`: the decode step's one-row int4 product on tinygemm's words, with the norm, the gate and the
residual, against the dequantized weight's fp32 product (Triton's CPU interpreter, every configuration; on a GPU,
the compiled kernel against tinygemm's layout as `Int4Linear` packs it, and inside the fast step)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter import run_interpreted


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cases(gemv4, packed, scale_zeros, w, dtype, generator=None, names=None):
    """name -> (ours, the fp32 reference) for the options of the step's products (or those in `names`); w: the
    dequantized (N, K) weight."""
    NS, K = w.shape
    dev = w.device
    x = torch.randn(K, device=dev, generator=generator)
    nw = torch.rand(K, device=dev, generator=generator) + 0.5
    r = torch.randn(NS, device=dev, generator=generator)
    xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * nw
    xd = x.to(dtype).float()
    out = {"plain": (gemv4(x.to(dtype), packed, scale_zeros, out_dtype=torch.float32), F.linear(xd, w)),
           "norm": (gemv4(x, packed, scale_zeros, norm=(nw, 1e-5), out_dtype=torch.float32), F.linear(xn, w)),
           "residual": (gemv4(x.to(dtype), packed, scale_zeros, residual=r), r + F.linear(xd, w).to(dtype).float())}
    if NS % 16 == 0:
        gu = F.linear(xn, w)
        half = NS // 2
        out["norm+gate"] = (gemv4(x, packed, scale_zeros, norm=(nw, 1e-5), gate=True, out_dtype=torch.float32),
                            F.silu(gu[:half]) * gu[half:])
    return {k: v for k, v in out.items() if names is None or k in names}


def check_products() -> None:
    from cogvlm import decode_int4
    from cogvlm.quantize import triton_mm
    from cogvlm.quantize.linear import dequantize_int4, quantize_int4, unpack_nibbles
    from cogvlm.quantize.tinygemm import tinygemm_layout

    torch.manual_seed(0)
    # (channels, inputs, group): channels not a multiple of any BLOCK_N, tiles not of any TILES, groups of two tiles
    for N, K, G in ((40, 384, 128), (48, 1280, 256), (16, 128, 128)):
        q = quantize_int4(torch.randn(N, K) * 0.05, G)
        packed = tinygemm_layout(unpack_nibbles(q["weight"]))
        scale_zeros = torch.stack([q["scales"], q["zeros"]], dim=-1).transpose(0, 1).contiguous()
        w = dequantize_int4(q["weight"], q["scales"], q["zeros"], torch.float32)
        assert decode_int4.supported(packed, scale_zeros, K, gate=N % 16 == 0)
        listed = len(decode_int4._int4_gemv.configs)
        for i in range(listed + len(decode_int4.CANDIDATES)):  # the autotuning list's, then the candidates
            triton_mm.interpreted_config = i
            config = None if i < listed else decode_int4.CANDIDATES[i - listed]
            gemv4 = functools.partial(decode_int4.gemv4, config=config)
            # (fp32 sums of f = 1 + c / 128 and of x, taken apart at the end: ~1e-5 where exact codes give 1e-7)
            for name, (got, want) in cases(gemv4, packed, scale_zeros, w, torch.float32).items():
                assert got.shape == want.shape, name
                assert rel(got, want) < 1e-4, (N, K, G, name, i, rel(got, want))
    assert not decode_int4.supported(packed, scale_zeros[:, :8], K, gate=True)  # halves of whole groups of 8 only
    q = quantize_int4(torch.randn(16, 256), 64)  # groups of half a tile: not read
    assert not decode_int4.supported(tinygemm_layout(unpack_nibbles(q["weight"])), torch.zeros(4, 16, 2), 256)


def int4_layer(K: int, N: int, group_size: int, dtype: torch.dtype):
    """An `Int4Linear` holding tinygemm's words as it does once packed on CUDA (the layout made on the CPU), and
    its dequantized fp32 weight."""
    from cogvlm.quantize.linear import Int4Linear, dequantize_int4, unpack_nibbles
    from cogvlm.quantize.tinygemm import tinygemm_layout

    layer = Int4Linear.from_linear(torch.nn.Linear(K, N, bias=False), decode_path=True, group_size=group_size)
    w = dequantize_int4(layer.weight, layer.scales, layer.zeros, torch.float32)
    packed = tinygemm_layout(unpack_nibbles(layer.weight))
    scale_zeros = torch.stack([layer.scales, layer.zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
    for name in ("weight", "scales", "zeros"):
        delattr(layer, name)
    layer.register_buffer("packed", packed)
    layer.register_buffer("scale_zeros", scale_zeros)
    layer.kernel, layer.words_readable = "cuda", True
    return layer, w


def check_fast_step() -> None:
    """The fast step's norm + product, and product + residual, on int4 layers: `gemv4`, where it applies."""
    from types import SimpleNamespace

    from cogvlm import decode_int4
    from cogvlm import decode_kernels as D
    from cogvlm.fast_decode import FastStep
    from cogvlm.llm import RMSNorm

    torch.manual_seed(0)
    dtype = torch.float16  # (a dtype `int4_rows` supports, as the layers' rows kernel must)
    step = FastStep(SimpleNamespace(dtype=dtype), None, D)
    K, F_ = 256, 48
    norm = RMSNorm(K, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    gate_up, w_gu = int4_layer(K, 2 * F_, 128, dtype)
    down, w_down = int4_layer(256, K, 128, dtype)  # 256 inputs -> K
    assert step.weights(gate_up, gate=True)[0] is decode_int4.gemv4
    x, pending = torch.randn(1, K), torch.randn(1, K)
    total, h = step.normed((x, pending), gate_up, norm, gate=True)
    xn = (x + pending) * torch.rsqrt((x + pending).pow(2).mean() + 1e-5) * norm.weight
    gu = F.linear(xn, w_gu)
    assert torch.equal(total, x + pending) and rel(h, F.silu(gu[:, :F_]) * gu[:, F_:]) < 2e-3
    a = torch.randn(1, 256).to(dtype)
    stream, left = step.added(total, down, a)
    assert left is None and stream.dtype == torch.float32
    assert rel(stream, total + F.linear(a.float(), w_down).to(dtype).float()) < 1e-3
    other, _ = int4_layer(K, K, 64, dtype)  # groups of half a tile: its own module (tinygemm's kernel)
    assert step.weights(other) == (None, None, None)


def test_products_in_the_interpreter():
    run_interpreted("test_decode_int4", "check_products")


def test_the_fast_step_multiplies_int4_layers_in_the_interpreter():
    run_interpreted("test_decode_int4", "check_fast_step")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm's words and the compiled kernel need a CUDA GPU")
def test_on_the_gpu_every_configuration_matches_the_dequantized_weight():
    """Groups of 128: every configuration of the autotuning list and the candidates, each compiled once (with the
    residual, or with the norm and the gate, in turn: each option with both SPLIT kinds), and all four options with
    one of them; groups of 256: one configuration. (The autotuner is not run: it would compile the whole list four
    times more; the interpreter test checks its picks.)"""
    from cogvlm import decode_int4
    from cogvlm.quantize.linear import Int4Linear

    dev = torch.device("cuda")
    gen = torch.Generator(dev).manual_seed(0)
    listed = decode_int4._int4_gemv.configs + decode_int4.CANDIDATES
    first = listed[0]
    for group_size, configs in ((128, listed), (256, [first])):
        for N, K in ((1040, 4096), (4096, 11008)):
            layer = Int4Linear.from_linear(torch.nn.Linear(K, N, bias=False).to(dev, torch.bfloat16),
                                           decode_path=True, group_size=group_size)
            layer.pack_for(dev, torch.bfloat16)
            assert layer.rows_kernel
            w = layer.dequantize(torch.float32)
            for i, config in enumerate(configs):
                gemv4 = functools.partial(decode_int4.gemv4, config=config)
                names = None if config is first else [("residual", "norm+gate")[i % 2]]
                for name, (ours, want) in cases(gemv4, layer.packed, layer.scale_zeros, w, torch.bfloat16, gen,
                                                names).items():
                    assert rel(ours, want) < 1e-2, (N, K, group_size, name, config)  # bf16 x, scales, output: ~3e-3
