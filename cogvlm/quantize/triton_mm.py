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


def available(x: torch.Tensor) -> bool:
    """Whether these kernels serve this input: enabled, on CUDA, half precision, at most MAX_ROWS rows."""
    return enabled() and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel() <= MAX_ROWS * x.shape[-1]


if triton is not None:
    def _row_configs():
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in [(4, 256, 2, 4), (8, 256, 4, 4), (16, 256, 4, 3), (16, 128, 4, 4),
                                   (32, 128, 8, 3), (8, 512, 4, 3), (32, 256, 8, 3), (64, 128, 8, 3)]]

    def _rows_configs():
        return [triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, m, k, w, s in [(64, 16, 128, 4, 4), (32, 16, 128, 4, 4), (64, 32, 128, 4, 4),
                                      (64, 64, 128, 4, 3), (128, 16, 128, 8, 3), (128, 64, 64, 8, 3),
                                      (32, 32, 256, 4, 3), (64, 16, 256, 4, 3)]]

    @triton.autotune(configs=_row_configs(), key=["N", "K"])
    @triton.jit
    def _int8_row(x_ptr, w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & (rk[None, :] < K), other=0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.autotune(configs=_rows_configs(), key=["M", "N", "K"])
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
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[None, :] < M) & (rn[:, None] < N))

    @triton.autotune(configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                              for n, w, s in [(8, 2, 4), (16, 4, 4), (32, 4, 4), (32, 8, 3), (64, 8, 3),
                                              (16, 2, 6), (64, 4, 4), (128, 8, 3)]],
                     key=["N", "K", "G"])
    @triton.jit
    def _int4_row(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        groups = K // G
        rj = tl.arange(0, G // 2)  # the bytes of one group: codes 2j (high nibble) and 2j + 1 (low nibble)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for g in range(0, groups):
            x_even = tl.load(x_ptr + g * G + 2 * rj).to(tl.float32)
            x_odd = tl.load(x_ptr + g * G + 2 * rj + 1).to(tl.float32)
            b = tl.load(w_ptr + rn[:, None] * (K // 2) + g * (G // 2) + rj[None, :], mask=n_ok[:, None], other=0)
            dot = tl.sum((b >> 4).to(tl.float32) * x_even[None, :] + (b & 15).to(tl.float32) * x_odd[None, :], axis=1)
            s = tl.load(s_ptr + rn * groups + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn * groups + g, mask=n_ok, other=0.0).to(tl.float32)
            acc += s * dot + (z - 8 * s) * tl.sum(x_even + x_odd, axis=0)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_M": m}, num_warps=w, num_stages=s)
                              for n, m, w, s in [(64, 16, 4, 4), (32, 16, 4, 4), (64, 32, 4, 4), (64, 64, 4, 3),
                                                 (128, 16, 8, 3), (128, 64, 8, 3), (32, 32, 4, 3), (16, 16, 2, 4)]],
                     key=["M", "N", "K", "G"])
    @triton.jit
    def _int4_rows(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok, m_ok = rn < N, rm < M
        groups = K // G
        rj = tl.arange(0, G // 2)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for g in range(0, groups):
            b = tl.load(w_ptr + rn[:, None] * (K // 2) + g * (G // 2) + rj[None, :], mask=n_ok[:, None], other=0)
            s = tl.load(s_ptr + rn * groups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + rn * groups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            x_at = x_ptr + rm[None, :] * K + g * G + 2 * rj[:, None]  # x.T's even columns of this group
            x_even = tl.load(x_at, mask=m_ok[None, :], other=0.0)
            x_odd = tl.load(x_at + 1, mask=m_ok[None, :], other=0.0)
            w_even = ((b >> 4).to(tl.float32) - 8) * s + z  # the weight's even columns, as `dequantize_int4`
            w_odd = ((b & 15).to(tl.float32) - 8) * s + z
            acc = tl.dot(w_even.to(x_even.dtype), x_even, acc)
            acc = tl.dot(w_odd.to(x_odd.dtype), x_odd, acc)
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[None, :] & n_ok[:, None])


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


_OPS = triton is not None and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
if _OPS:
    @torch.library.triton_op("cogvlm::int8_mm", mutates_args=())
    def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return launch_int8(x, weight, scales, torch.library.wrap_triton)

    @torch.library.triton_op("cogvlm::int4_mm", mutates_args=())
    def int4_mm(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return launch_int4(x, nibbles, scales, zeros, torch.library.wrap_triton)
