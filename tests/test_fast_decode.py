"""The batch-1 decode step in Triton kernels (`cogvlm.fast_decode`, `cogvlm.decode_kernels`) against the model's own
step, on the fixture checkpoint, in Triton's CPU interpreter (in a child process: the interpreter is chosen when the
kernels are defined): the kernels one by one against torch, then whole decode steps, fp32 (tight) and with int8
layers and a swapped-in projection (the per-projection fallback), and when the fast step must not be used."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter import run_interpreted


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_kernels() -> None:
    from cogvlm import decode_kernels as D
    from cogvlm.quantize import triton_mm as T
    from cogvlm.quantize.linear import quantize_int8

    torch.manual_seed(0)
    N, K = 40, 320  # not multiples of the blocks: partial tiles
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2 * torch.finfo(torch.bfloat16).eps)):
        for config in range(len(D._gemv.configs)):
            T.interpreted_config = config
            w = (torch.randn(2 * N, K) * 0.05).to(dtype)
            x, nw, r = torch.randn(K), torch.rand(K) + 0.5, torch.randn(N)
            xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * nw
            q8 = quantize_int8(w.float())
            w8 = q8["weight"].float() * q8["scales"].float()[:, None]
            gated = lambda gu: F.silu(gu[:N]) * gu[N:]  # noqa: E731
            cases = {
                "plain": (D.gemv(x.to(dtype), w[:N]), F.linear(x.to(dtype).float(), w[:N].float())),
                "norm": (D.gemv(x, w[:N], norm=(nw, 1e-5), out_dtype=dtype), F.linear(xn, w[:N].float())),
                "norm+gate": (D.gemv(x, w, norm=(nw, 1e-5), gate=True, out_dtype=dtype),
                              gated(F.linear(xn, w.float()))),
                "residual": (D.gemv(x.to(dtype), w[:N], residual=r), r + F.linear(x.to(dtype).float(), w[:N].float())),
                "int8": (D.gemv(x.to(dtype), q8["weight"][:N], q8["scales"][:N].to(dtype), out_dtype=dtype),
                         F.linear(x.to(dtype).float(), w8[:N])),
                "int8 norm+gate": (D.gemv(x, q8["weight"], q8["scales"].to(dtype), norm=(nw, 1e-5), gate=True,
                                          out_dtype=dtype), gated(F.linear(xn, w8))),
            }
            for name, (got, want) in cases.items():
                assert got.shape == want.shape, name
                assert rel(got, want) < bound, f"{name}, config {config}, {dtype}: {rel(got, want):.2e}"
            assert cases["residual"][0].dtype == torch.float32
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, torch.finfo(torch.bfloat16).eps)):
        x, w = torch.randn(3, 200) * 3, (torch.rand(200) + 0.5).to(dtype)  # fp32 residual rows, D not a power of 2
        y = torch.randn(3, 200).to(dtype)  # a product to add first
        for add in (None, y):
            total = x if add is None else x + add.float()
            want = (w.float() * (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5))).to(dtype)
            got_total, got = D.add_norm(x, add, w, 1e-5)
            assert torch.equal(got_total, total) and got_total.dtype == torch.float32
            assert got.dtype == dtype and rel(got, want) < bound, f"add_norm {dtype}: {rel(got, want):.2e}"
        gu = torch.randn(3, 2 * 1500).to(dtype)  # F not a multiple of the block
        want = F.silu(gu[:, :1500]) * gu[:, 1500:]
        got = D.silu_gate(gu)
        assert got.dtype == dtype and rel(got, want) < bound, f"silu_gate {dtype}: {rel(got, want):.2e}"
    for config in range(len(D._attend_chunk.configs)):
        T.interpreted_config = config
        for dtype in (torch.float32, torch.bfloat16):
            check_rope_attend(2, (97, 64, 149, 0)[config % 4], dtype)  # mid-chunk, a chunk's first slot, last, 0


def check_rope_attend(B: int, pos: int, dtype: torch.dtype, device: str = "cpu") -> None:
    """`rope_kv` (rotary, the cache writes at pos) then `attend` against torch, over a cache of 150 slots."""
    from cogvlm import decode_kernels as D

    H, S, hd, bound = 3, 150, 16, 1e-5 if dtype == torch.float32 else 2e-2
    qkv = torch.randn(B, 3 * H * hd, device=device).to(dtype)
    angles = torch.randn(B, hd // 2, device=device)
    cos, sin = angles.cos(), angles.sin()
    k_cache, v_cache = (torch.randn(B, H, S, hd, device=device).to(dtype) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    q = D.rope_kv(qkv, cos, sin, k_cache, v_cache, torch.tensor([pos], device=device))
    t = qkv.view(B, 3, H, hd).float()

    def rotary(z):
        z1, z2 = z.chunk(2, -1)
        c, s = cos[:, None], sin[:, None]
        return torch.cat([z1 * c - z2 * s, z2 * c + z1 * s], -1)

    assert rel(q, rotary(t[:, 0])) < bound and rel(k_cache[:, :, pos], rotary(t[:, 1])) < bound
    assert torch.equal(v_cache[:, :, pos], t[:, 2].to(dtype))
    others = torch.arange(S, device=device) != pos
    assert torch.equal(k_cache[:, :, others], before[0][:, :, others])
    assert torch.equal(v_cache[:, :, others], before[1][:, :, others])
    valid = torch.rand(B, S, device=device) > 0.3
    valid[:, pos + 1:] = True  # slots after pos are ignored even where marked valid
    valid[:, pos] = False  # and the query's own slot is always seen
    out = D.attend(q, k_cache, v_cache, valid, torch.tensor([pos], device=device))
    mask = valid.clone()
    mask[:, pos + 1:], mask[:, pos] = False, True
    want = F.scaled_dot_product_attention(q.float()[:, :, None], k_cache.float(), v_cache.float(),
                                          attn_mask=mask[:, None, None])[:, :, 0]
    assert out.shape == q.shape and rel(out, want) < bound, f"attend {dtype}: {rel(out, want):.2e}"


def check_measured() -> None:
    """A measured configuration (`decode_kernels.MEASURED`) is found by (N, K, NORM, GATE, RESIDUAL, INT8) and launched
    instead of the autotuned one; other shapes stay autotuned. Every measured configuration is in the autotuning
    list, so `check_kernels` runs it."""
    from cogvlm import decode_kernels as D
    from cogvlm.quantize.linear import quantize_int8

    listed = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, c.kwargs["WORDS"])
              for c in D._gemv.configs}
    for rows in D.MEASURED.values():
        for key, row in rows.items():
            assert len(key) == 6 and (tuple(row) + (False,))[:5] in listed, (key, row)
    torch.manual_seed(0)
    N, K = 40, 320
    q8 = quantize_int8(torch.randn(N, K) * 0.05)
    x, nw = torch.randn(K), torch.rand(K) + 0.5
    want = F.linear(x * torch.rsqrt(x.pow(2).mean() + 1e-5) * nw, q8["weight"].float() * q8["scales"].float()[:, None])
    chosen = D._gemv.configs[-1]
    autotuned = []
    real_launch, real_measured = D.launch, D.measured_configs
    D.launch = lambda *a, **k: autotuned.append(a[0]) or real_launch(*a, **k)
    D.measured_configs = lambda device: {(N, K, True, False, False, True): chosen}
    try:
        got = D.gemv(x, q8["weight"], q8["scales"], norm=(nw, 1e-5), out_dtype=torch.float32)
        assert not autotuned and rel(got, want) < 1e-5  # the measured configuration ran
        D.gemv(x, q8["weight"], q8["scales"], out_dtype=torch.float32)  # no norm: another key, autotuned
        assert autotuned == [D._gemv]
    finally:
        D.launch, D.measured_configs = real_launch, real_measured


def fixture_model():
    import tempfile

    from cogvlm import CogVLM
    from cogvlm.convert import convert
    from tests.test_generate import BATCHED, FIXTURES, MANIFEST, SINGLE, TOKENIZER, case_tensors

    out = convert(FIXTURES / MANIFEST.get("model_dir", "model"), Path(tempfile.mkdtemp()) / "converted", dtype="fp32",
                  tokenizer=TOKENIZER)
    model = CogVLM.from_pretrained(out, device="cpu", dtype=torch.float32)
    image_case = next(n for n in SINGLE if "pixel_values" in case_tensors(n))
    return model, case_tensors(image_case), case_tensors(BATCHED[0]) if BATCHED else None


def decode_both(model, t, steps: int = 6) -> tuple[float, int]:
    """Decode `steps` greedy tokens with the model's step and with the fast step from the same prompt; returns the
    largest relative difference of their logits and how many greedy tokens agree."""
    from cogvlm.fast_decode import FastStep
    from cogvlm.generate import DecodeSession

    B = t["input_ids"].shape[0]
    sessions = [DecodeSession(model, B, t["input_ids"].shape[1] + steps + 3, cuda_graph=False) for _ in range(2)]
    fast = FastStep.build(model, B, sessions[1].caches)
    assert fast is not None
    sessions[1].fast = fast
    logits = [s.prefill(t["input_ids"], t["token_type_ids"], t.get("attention_mask"), t.get("pixel_values"))
              for s in sessions]
    worst, agree = 0.0, 0
    with torch.no_grad():
        for _ in range(steps):
            tokens = [lg.argmax(-1) for lg in logits]
            agree += int((tokens[0] == tokens[1]).all())
            logits = [s.step(tokens[0]) for s in sessions]  # both fed the model's token
            worst = max(worst, rel(logits[1], logits[0]))
    for a, b in zip(*(s.caches for s in sessions)):  # the caches the fast step wrote hold the same keys and values
        assert rel(b.k, a.k) < 1e-4 and rel(b.v, a.v) < 1e-4
    return worst, agree


def check_decode_steps() -> None:
    from torch import nn

    from cogvlm import decode_kernels as D
    from cogvlm.fast_decode import FastStep
    from cogvlm.quantize import QuantSpec, pack_model, quantize_model
    from cogvlm.quantize import triton_mm as T

    # the interpreter runs one configuration of each list: here the product's widest (64 x 128), so that lm_head's
    # product over the whole vocabulary takes few programs
    T.interpreted_config = max(range(len(D._gemv.configs)), key=lambda i: D._gemv.configs[i].kwargs["BLOCK_N"])
    model, t, batched = fixture_model()
    worst, agree = decode_both(model, t)
    assert worst < 1e-4 and agree == 6, (worst, agree)
    # a swapped-in projection (here a Sequential around the same linear) runs through its own module
    mlp = model.llm.layers[0].mlp.language_expert
    mlp.down = nn.Sequential(mlp.down)
    worst, agree = decode_both(model, t)
    assert worst < 1e-4 and agree == 6, (worst, agree)
    mlp.down = mlp.down[0]
    if batched is not None:  # several rows, left padding: cuBLAS products, the other kernels
        worst, agree = decode_both(model, batched)
        assert worst < 1e-4 and agree == 6, (worst, agree)
    quantize_model(model, QuantSpec("int8"))
    pack_model(model, torch.float32)
    worst, agree = decode_both(model, t)
    assert worst < 1e-3 and agree == 6, (worst, agree)
    caches = model.new_kv_caches(1, 8)
    assert FastStep.build(model, 17, model.new_kv_caches(17, 8)) is None  # up to MAX_BATCH rows
    handle = model.llm.layers[1].register_forward_hook(lambda *a: None)
    assert FastStep.build(model, 1, caches) is None  # a hook would be skipped: the ordinary step
    handle.remove()
    handle = model.llm.lm_head.register_forward_hook(lambda *a: None)
    assert FastStep.build(model, 1, caches) is None  # lm_head's product runs in the kernel: its hook would be skipped
    handle.remove()
    assert FastStep.build(model, 1, caches) is not None
    os.environ["COGVLM_DECODE_KERNELS"] = "0"
    assert FastStep.build(model, 1, caches) is None


def test_decode_kernels_match_torch_in_the_interpreter():
    run_interpreted("test_fast_decode", "check_kernels")


def test_measured_configurations_replace_the_autotuned_pick_in_the_interpreter():
    run_interpreted("test_fast_decode", "check_measured")


def test_fast_step_decodes_as_the_model_in_the_interpreter():
    run_interpreted("test_fast_decode", "check_decode_steps")


def test_sessions_on_the_cpu_keep_the_model_step():
    from cogvlm.generate import DecodeSession

    model, _, _ = fixture_model()
    assert DecodeSession(model, 1, 16).fast is None  # no CUDA graph on the CPU: the ordinary step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels' compiled code (its PTX) needs a CUDA GPU")
def test_rotary_and_attention_match_torch_on_the_gpu():
    """`rope_kv` and `attend` as compiled for the GPU, at one row with programmatic dependent launch (where the GPU
    has it) and at three rows, the slot pos at several places in its chunk."""
    torch.manual_seed(0)
    for B in (1, 3):
        for pos in (97, 64, 149, 0):
            for dtype in (torch.float32, torch.bfloat16):
                check_rope_attend(B, pos, dtype, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels' compiled code (its PTX) needs a CUDA GPU")
def test_int8_products_match_torch_on_the_gpu():
    """Every int8 configuration of the decode product as compiled for the GPU (the interpreter does not run the
    byte permutes of `_word_codes_to_f32`), against the dequantized weight's fp32 product."""
    from cogvlm import decode_kernels as D
    from cogvlm.quantize.linear import quantize_int8

    torch.manual_seed(0)
    for N, K in ((40, 320), (300, 4096)):
        w = torch.randn(2 * N, K, device="cuda") * 0.05
        x, nw = torch.randn(K, device="cuda"), torch.rand(K, device="cuda") + 0.5
        xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * nw
        q8 = quantize_int8(w)
        w8 = q8["weight"].float() * q8["scales"].float()[:, None]
        for config in D._prune(D._gemv.configs, {"INT8": True, "K": K}):
            got = D.gemv(x, q8["weight"][:N], q8["scales"][:N], out_dtype=torch.float32, config=config)
            assert rel(got, F.linear(x, w8[:N])) < 1e-5, (N, K, config)
            got = D.gemv(x, q8["weight"], q8["scales"], norm=(nw, 1e-5), gate=True, out_dtype=torch.float32,
                         config=config)
            want = F.linear(xn, w8)
            assert rel(got, F.silu(want[:N]) * want[N:]) < 1e-5, (N, K, config)
