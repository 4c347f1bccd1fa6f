"""The Triton kernels of the quantized layers (`cogvlm.quantize.triton_mm`) against the dequantized weight, run in Triton's CPU
interpreter (in a child process: the interpreter is chosen when the kernels are defined), for every configuration
each kernel autotunes over, on shapes that leave partial tiles. The interpreter computes `tl.dot` through numpy,
which has no bf16, so the several-row kernels are checked in fp16 (their code does not depend on the dtype); and it
rounds to bf16 by truncation, so the bound is the dtype's epsilon rather than half of it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter import run_interpreted


def check_every_config() -> None:
    from cogvlm.quantize import triton_mm as T
    from cogvlm.quantize.linear import dequantize_int4, quantize_int4, quantize_int8

    assert T.INTERPRETED
    torch.manual_seed(0)
    N, K, G = 40, 320, 32  # N and K not multiples of the blocks: partial tiles
    w = torch.randn(N, K) * 0.05
    q8, q4 = quantize_int8(w), quantize_int4(w, G)
    for config in range(8):
        T.interpreted_config = config
        for rows, dtype in ((1, torch.bfloat16), (1, torch.float16), (3, torch.float16), (19, torch.float16)):
            x = torch.randn(rows, K).to(dtype)
            w8 = (q8["weight"].float() * q8["scales"].float()[:, None]).to(dtype)
            y = T.launch_int8(x, q8["weight"], q8["scales"])
            want = F.linear(x.float(), w8.float())
            err = ((y.float() - want).norm() / want.norm()).item()
            assert y.shape == (rows, N) and y.dtype == dtype
            assert err < torch.finfo(dtype).eps, f"int8 config {config} rows {rows} {dtype}: relative error {err:.2e}"
    for dtype in (torch.float16, torch.bfloat16):  # the dequantization kernels: the reference's weight, rounded
        w8 = T.launch_int8_dequantize(q8["weight"], q8["scales"], dtype)
        ref8 = q8["weight"].float() * q8["scales"].float()[:, None]  # (the interpreter rounds bf16 by truncation)
        assert w8.dtype == dtype and ((w8.float() - ref8).abs() <= ref8.abs() * torch.finfo(dtype).eps).all()
        w4 = T.launch_int4_dequantize(q4["weight"], q4["scales"], q4["zeros"], dtype).float()
        ref = dequantize_int4(q4["weight"], q4["scales"], q4["zeros"], torch.float32)
        assert w4.shape == (N, K) and ((w4 - ref).abs() <= ref.abs() * torch.finfo(dtype).eps + 1e-6).all()


def test_kernels_match_the_dequantized_weight_in_the_interpreter():
    run_interpreted("test_triton_mm", "check_every_config")


def test_the_kernels_are_off_on_the_cpu_and_with_cogvlm_triton_0(monkeypatch):
    from cogvlm.quantize import triton_mm
    from cogvlm.quantize.linear import triton_kernels

    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert triton_mm.enabled() and triton_kernels(x, x.dtype) is None  # CPU tensors take torch's own kernels
    monkeypatch.setenv("COGVLM_TRITON", "0")
    assert not triton_mm.enabled()


def test_kept_counters_are_one_zeroed_buffer_per_device_and_owner_that_grows():
    from cogvlm.quantize import triton_mm

    cpu = torch.device("cpu")
    first = triton_mm.counters(cpu, 10, "test-a")
    assert first.dtype == torch.int32 and first.numel() >= 10 and not first.any()
    assert triton_mm.counters(cpu, 10, "test-a") is first  # kept: no new buffer (and no fill) per call
    assert triton_mm.counters(cpu, 10, "test-b") is not first  # each owner its own
    bigger = triton_mm.counters(cpu, first.numel() + 1, "test-a")
    assert bigger.numel() > first.numel() and not bigger.any()
    assert triton_mm.counters(cpu, 10, "test-a") is bigger


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels' PTX needs a CUDA GPU")
def test_int8_layers_on_the_gpu_compute_with_their_codes_at_every_row_count(monkeypatch):
    """An int8 layer on the GPU against its dequantized weight in fp32: one row through the fast decode step's
    product (`decode_kernels.gemv`, seen called), a few rows through `int8_mm`, a prefill's rows through the
    dequantized weight and cuBLAS."""
    from cogvlm import decode_kernels
    from cogvlm.quantize.linear import Int8Linear

    calls = []
    plain = decode_kernels.gemv
    monkeypatch.setattr(decode_kernels, "gemv", lambda *a, **k: calls.append(a[1].shape) or plain(*a, **k))
    torch.manual_seed(0)
    for N, K in ((300, 4096), (4096, 11008), (50, 322)):  # 322: K % 4 != 0, so no word configurations
        layer = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False)).cuda().to(torch.bfloat16)
        layer.pack_for(None, torch.bfloat16)
        w = layer.dequantize(torch.float32)
        for rows in (1, 3, 100):
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                y = layer(x)
            want = x.float() @ w.T
            err = ((y.float() - want).norm() / want.norm()).item()
            assert y.shape == (rows, N) and y.dtype == torch.bfloat16
            assert err < torch.finfo(torch.bfloat16).eps, f"{N}x{K}, {rows} rows: relative error {err:.2e}"
    assert calls == [(300, 4096), (4096, 11008), (50, 322)]
