"""Triton kernels that multiply by int8 / int4 weights in their stored format, reading only the quantized bytes.

    y = x @ W.T     x (M, K) bf16/fp16,  W in the stored format of `cogvlm.quantize.linear`:
    int8   codes int8 (N, K), scales (N,)                    W[n, k] = codes[n, k] * scales[n]
    int4   nibbles uint8 (N, K/2), scales, zeros (N, K/G)    W[n, k] = (code[n, k] - 8) * scales[n, g] + zeros[n, g]

Two kernels per format, both memory-bound at the sizes they serve (decode steps, the prompt's text rows):

- `*_row`: one row of x (batch-1 decode). Each program owns BLOCK_N output channels and walks K; it never builds a
  weight tile for the tensor cores, just multiplies and adds in fp32. int4 sums each group before applying its
  scale and zero: sum_k x_k W_k = s * sum_k x_k c_k + (z - 8 s) * sum_k x_k.
- `*_rows`: a few rows (batch 2..64, the prompt's text). Weights are dequantized to x's dtype in registers (in fp32,
  rounded once, as `dequantize_int4` does) and fed to `tl.dot` as its first operand against x transposed, so the
  MMA's wide side is the output channels, not the handful of rows.

Programs that share a weight tile are launched next to each other, so the tile comes from L2 after the first read.
Both are autotuned once per weight shape (and row count), which happens during the decode session's warm-up, before
its CUDA graph is captured. `int8_mm` / `int4_mm` are PyTorch custom ops (`torch.library.triton_op`), so compiled
layers trace them as they are. The parity tests run the same kernels in Triton's CPU interpreter.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. a CPU-only install): `available()` is False and the callers use torch's ops
    triton = None

import os

ROW_KERNEL_MAX_ROWS = 1  # rows served by the one-row kernels; up to MAX_ROWS by the tensor-core ones
MAX_ROWS = 64
# Triton's CPU interpreter (TRITON_INTERPRET=1, the parity tests) cannot time configurations: it runs this one of
# each kernel's autotuning list.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted_config = 0


def enabled() -> bool:
    """Triton is there, torch can wrap its kernels as custom ops, and COGVLM_TRITON=0 does not turn them off."""
    return _OPS and os.environ.get("COGVLM_TRITON", "1") != "0"


def serves(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels serve a tensor on t's device computing in `dtype`: enabled, CUDA, half precision."""
    return enabled() and t.is_cuda and dtype in (torch.bfloat16, torch.float16)


def available(x: torch.Tensor) -> bool:
    """Whether the products serve this input: `serves` it, and it has at most MAX_ROWS rows."""
    return serves(x, x.dtype) and x.numel() <= MAX_ROWS * x.shape[-1]


if triton is not None:
    # Integer-to-float conversion instructions run at a quarter of the rate of float arithmetic on recent NVIDIA
    # GPUs, too slow to convert a weight per byte read. These conversions use integer logic and one float add
    # instead: the bits 0x4B000000 + u (u < 2^23) are the float 2^23 + u.
    @triton.jit
    def _int8_to_f32(w):
        """int8 codes -> float32, exactly."""
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128 + code

    @triton.jit
    def _nibble_minus_8(words, shift):
        """The 4 bits at `shift` of int32 words, minus 8, as float32."""
        return (((words >> shift) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0

    def _configs(names, rows):
        return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]

    _ROWS_CONFIGS = _configs(  # (BLOCK_N, BLOCK_M, warps, stages): few rows, then prefill sizes
        ("BLOCK_N", "BLOCK_M"), [(64, 16, 4, 4), (32, 16, 4, 4), (64, 32, 4, 4), (128, 16, 8, 3), (16, 16, 2, 4),
                                 (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 4)])

    @triton.autotune(configs=_configs(("BLOCK_N", "BLOCK_K"), [
        (4, 512, 2, 1), (8, 512, 4, 1), (16, 256, 4, 1), (16, 512, 4, 3), (32, 256, 4, 1), (8, 1024, 4, 1),
        (16, 1024, 8, 1), (32, 512, 8, 3)]), key=["N", "K"])
    @triton.jit
    def _int8_row(x_ptr, w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & (rk[None, :] < K), other=0)
            acc += _int8_to_f32(w) * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.autotune(configs=[triton.Config({**c.kwargs, "BLOCK_K": 128 if c.kwargs["BLOCK_M"] <= 32 else 64},
                                            num_warps=c.num_warps, num_stages=c.num_stages) for c in _ROWS_CONFIGS],
                     key=["M", "N", "K"])
    @triton.jit
    def _int8_rows(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # programs with the same weight tile run together
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & k_ok[None, :], other=0)
            xt = tl.load(x_ptr + rm[None, :] * K + rk[:, None], mask=(rm[None, :] < M) & k_ok[:, None], other=0.0)
            acc = tl.dot(_int8_to_f32(w).to(xt.dtype), xt, acc)
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[None, :] < M) & (rn[:, None] < N))

    @triton.jit
    def _shifts():
        """Where code 8w + j sits in int32 word w: byte j // 2, the high nibble for even j."""
        j = tl.arange(0, 8)
        return 8 * (j // 2) + 4 * (1 - j % 2)

    @triton.autotune(configs=_configs(("BLOCK_N", "GROUPS"), [
        (8, 4, 4, 1), (16, 2, 4, 1), (16, 4, 4, 1), (32, 2, 4, 1), (32, 4, 8, 1), (64, 2, 8, 1), (8, 8, 4, 1),
        (16, 8, 8, 1)]), key=["N", "K", "G"])
    @triton.jit
    def _int4_row(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUPS: tl.constexpr):
        # Read as int32 words of 8 codes, GROUPS groups of G // 8 words per row and step; x in k order beside them.
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        n_groups = K // G
        WORDS: tl.constexpr = G // 8
        rw = tl.arange(0, WORDS)
        words_at = w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None, None] * (K // 8) + rw[None, None, :]
        acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
        for g0 in range(0, n_groups, GROUPS):
            g = g0 + tl.arange(0, GROUPS)
            g_ok = g < n_groups
            words = tl.load(words_at + g[None, :, None] * WORDS, mask=n_ok[:, None, None] & g_ok[None, :, None],
                            other=0)  # (BLOCK_N, GROUPS, WORDS)
            k = g[:, None, None] * G + rw[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
            x = tl.load(x_ptr + k, mask=g_ok[:, None, None], other=0.0).to(tl.float32)  # (GROUPS, WORDS, 8)
            c = _nibble_minus_8(words[:, :, :, None], _shifts()[None, None, None, :])  # (.., WORDS, 8), k order
            dot = tl.sum(tl.sum(c * x[None, :, :, :], axis=3), axis=2)  # sum_k x_k (c_k - 8)
            at = rn[:, None] * n_groups + g[None, :]
            ok = n_ok[:, None] & g_ok[None, :]
            s = tl.load(s_ptr + at, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
            acc += s * dot + z * tl.sum(tl.sum(x, axis=2), axis=1)[None, :]  # w = (c - 8) s + z
        tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.autotune(configs=_ROWS_CONFIGS, key=["M", "N", "K", "G"])
    @triton.jit
    def _int4_rows(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok, m_ok = rn < N, rm < M
        groups = K // G
        WORDS: tl.constexpr = G // 8
        words_at = w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (K // 8) + tl.arange(0, WORDS)[None, :]
        x_at = x_ptr + rm[None, :] * K + tl.arange(0, G)[:, None]  # x.T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for g in range(0, groups):
            words = tl.load(words_at + g * WORDS, mask=n_ok[:, None], other=0)
            s = tl.load(s_ptr + rn * groups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + rn * groups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            c = _nibble_minus_8(words[:, :, None], _shifts()[None, None, :])
            w = tl.reshape(c, (BLOCK_N, G)) * s + z  # as `dequantize_int4` computes it
            xt = tl.load(x_at + g * G, mask=m_ok[None, :], other=0.0)
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[None, :] & n_ok[:, None])

    # Dequantization into a temporary weight, for products of more rows (the prefill's image positions), which
    # then run at cuBLAS's rate.
    @triton.jit
    def _int8_codes(w_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + i, mask=i < numel, other=0)
        tl.store(out_ptr + i, _int8_to_f32(w).to(out_ptr.dtype.element_ty), mask=i < numel)

    @triton.jit
    def _int4_dequantize(w_ptr, s_ptr, z_ptr, out_ptr, n_words, G: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # word i holds elements 8i..8i+7 of the flat weight
        ok = i < n_words
        words = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + i, mask=ok, other=0)
        group = (i * 8) // G  # the flat (N, K / G) index: K is a multiple of G
        s = tl.load(s_ptr + group, mask=ok, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + group, mask=ok, other=0.0).to(tl.float32)[:, None]
        w = _nibble_minus_8(words[:, None], _shifts()[None, :]) * s + z
        tl.store(out_ptr + i[:, None] * 8 + tl.arange(0, 8)[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])


def _launch(kernel, grid, wrap, *args) -> None:
    if INTERPRETED:
        config = kernel.configs[interpreted_config % len(kernel.configs)].all_kwargs()
        kernel.fn[grid(config)](*args, **config)
    else:
        wrap(kernel)[grid](*args)


def launch_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, wrap=lambda k: k) -> torch.Tensor:
    """(M, K) @ int8 (N, K).T -> (M, N) in x's dtype. `wrap`: how to launch (`wrap_triton` inside the custom op)."""
    (M, K), N = x.shape, weight.shape[0]
    y = x.new_empty(M, N)
    if M <= ROW_KERNEL_MAX_ROWS:
        for m in range(M):
            _launch(_int8_row, lambda c: (triton.cdiv(N, c["BLOCK_N"]),), wrap, x[m], weight, scales, y[m], N, K)
    else:
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))  # noqa: E731
        _launch(_int8_rows, grid, wrap, x, weight, scales, y, M, N, K)
    return y


def launch_int4(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                wrap=lambda k: k) -> torch.Tensor:
    """(M, K) @ int4 (N, K).T -> (M, N) in x's dtype."""
    (M, K), N = x.shape, nibbles.shape[0]
    G = K // scales.shape[1]
    y = x.new_empty(M, N)
    if M <= ROW_KERNEL_MAX_ROWS:
        for m in range(M):
            _launch(_int4_row, lambda c: (triton.cdiv(N, c["BLOCK_N"]),), wrap, x[m], nibbles, scales, zeros, y[m],
                    N, K, G)
    else:
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))  # noqa: E731
        _launch(_int4_rows, grid, wrap, x, nibbles, scales, zeros, y, M, N, K, G)
    return y


def launch_int8_codes(weight: torch.Tensor, dtype: torch.dtype, wrap=lambda k: k) -> torch.Tensor:
    """int8 codes -> the same integers in `dtype` (exact in bf16/fp16), one pass at copy speed."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    wrap(_int8_codes)[(triton.cdiv(weight.numel(), 4096),)](weight, out, weight.numel(), BLOCK=4096)
    return out


def launch_int4_dequantize(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype,
                           wrap=lambda k: k) -> torch.Tensor:
    """The (N, K) weight in `dtype`, as `dequantize_int4` computes it (fp32, rounded once)."""
    N, K = nibbles.shape[0], nibbles.shape[1] * 2
    out = torch.empty(N, K, dtype=dtype, device=nibbles.device)
    n_words = N * K // 8
    wrap(_int4_dequantize)[(triton.cdiv(n_words, 512),)](nibbles, scales, zeros, out, n_words, K // scales.shape[1],
                                                        BLOCK=512)
    return out


_OPS = triton is not None and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
if _OPS:
    @torch.library.triton_op("cogvlm::int8_mm", mutates_args=())
    def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return launch_int8(x, weight, scales, torch.library.wrap_triton)

    @torch.library.triton_op("cogvlm::int4_mm", mutates_args=())
    def int4_mm(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return launch_int4(x, nibbles, scales, zeros, torch.library.wrap_triton)

    @torch.library.triton_op("cogvlm::int8_codes", mutates_args=())
    def int8_codes(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return launch_int8_codes(weight, dtype, torch.library.wrap_triton)

    @torch.library.triton_op("cogvlm::int4_dequantize", mutates_args=())
    def int4_dequantize(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
        return launch_int4_dequantize(nibbles, scales, zeros, dtype, torch.library.wrap_triton)
