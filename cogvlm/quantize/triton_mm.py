"""Triton kernels for the int8 / int4 layers, on their stored format (`cogvlm.quantize.linear`):

    int8   codes int8 (N, K), scales (N,)                    W[n, k] = codes[n, k] * scales[n]
    int4   nibbles uint8 (N, K/2), scales, zeros (N, K/G)    W[n, k] = (code[n, k] - 8) * scales[n, g] + zeros[n, g]

- `int8_mm(x, codes, scales)`: y = x @ W.T reading only the int8 bytes, for up to MAX_ROWS rows (decode steps, the
  prompt's text rows). One row (`_int8_row`): each program owns BLOCK_N output channels, multiplies and adds in
  fp32 across K and scales at the end. Several rows (`_int8_rows`): the codes, converted in registers, are the
  first operand of `tl.dot` against x transposed, so the MMA's wide side is the output channels, not the handful of
  rows; programs sharing a weight tile are launched together, so it comes from L2 after the first read.
- `int8_dequantize(codes, scales, dtype)`, `int4_dequantize(nibbles, scales, zeros, dtype)`: the weight in `dtype` in one pass,
  for products of more rows (the prefill's image positions), which then run at cuBLAS's rate.

Codes become floats through integer logic and one float add (the bits 0x4B000000 + u are the float 2^23 + u), not
through integer-to-float conversion instructions, which run at a quarter of the float rate. Measured on an H200
(`bench/quant_kernels.py`, docs/quantize.md): the one-row int8 product reads 2.6-3.5 TB/s, 1.4-2.2x bf16's cuBLAS
GEMV at the decoder's shapes; torch's own int8 -> bf16 conversion ran at about 0.9 TB/s. For int4 at few rows,
torch's tinygemm (1.6-2.1x bf16 at one row) beat the Triton products tried here (0.5-1.2x), so the int4 layers keep
it for decode steps and take only the dequantization from this file.

The products are autotuned per weight shape (and row count) on first use, in the decode session's warm-up before
its CUDA graph is captured. All four are PyTorch custom ops (`torch.library.triton_op`), so compiled layers trace
them as they are. The parity tests run the same kernels in Triton's CPU interpreter.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: `enabled()` is False and the callers use torch's ops
    triton = None

import os

MAX_ROWS = 64  # int8_mm's rows; beyond, dequantizing + cuBLAS was faster (0.6-0.8x bf16 against 0.35-0.57x at 1226)
# Triton's CPU interpreter (TRITON_INTERPRET=1, the parity tests) cannot time configurations: it runs this one of
# each kernel's autotuning list.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted_config = 0


def enabled() -> bool:
    """Triton is there, torch can wrap its kernels as custom ops, and COGVLM_TRITON=0 does not turn them off."""
    return _OPS and os.environ.get("COGVLM_TRITON", "1") != "0"


if triton is not None:
    # Integer-to-float conversion instructions run at a quarter of the rate of float arithmetic on recent NVIDIA
    # GPUs, too slow to convert a weight per byte read. These conversions use integer logic and one float add
    # instead: the bits 0x4B000000 + u (u < 2^23) are the float 2^23 + u.
    @triton.jit
    def _int8_to_f32(w):
        """int8 codes -> float32, exactly."""
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128 + code

    _INTERPRETED = tl.constexpr(INTERPRETED)

    @triton.jit
    def _word_codes_to_f32(words):
        """The four int8 codes of int32 words (code b in byte b) as four float32 tensors, exactly, in 2.25
        instructions a code: the word's sign bits flipped once (each byte then holds code + 128), each byte moved
        under the exponent bits 0x4B by a byte permute (`prmt`), the float 2^23 + 128 + code, and the offset taken
        off (one float add). With shifts and masks instead, `decode_kernels._gemv`'s loop took 731 instructions per
        128 codes (each mask kept in a register of its own), 639 with this (sm_90 code from Triton 3.9); on an H200
        the one-row products read 0-16 % faster (docs/benchmarks.md). Taking the offset off once per sum instead of
        off every code saved the float add but no time. Triton's CPU interpreter has no PTX: it computes
        the same bits with shifts and masks."""
        if _INTERPRETED:
            flipped = words ^ -2139062144  # 0x80808080 as int32
            b0 = (flipped & 0xFF) | 0x4B000000
            b1 = ((flipped >> 8) & 0xFF) | 0x4B000000
            b2 = ((flipped >> 16) & 0xFF) | 0x4B000000
            b3 = ((flipped >> 24) & 0xFF) | 0x4B000000
        else:
            # prmt d, a, b, selector: byte i of d is byte (nibble i of the selector) of [a | b]; with b = 0x4B, byte
            # 4 is 0x4B and byte 5 zero: d = [byte k of a, 0, 0, 0x4B] from the low byte up, selector 0x455k
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x4B, 0x4550; prmt.b32 $1, t, 0x4B, 0x4551;"
                " prmt.b32 $2, t, 0x4B, 0x4552; prmt.b32 $3, t, 0x4B, 0x4553; }",
                "=r,=r,=r,=r,r", [words], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        return (b0.to(tl.float32, bitcast=True) - 8388736.0, b1.to(tl.float32, bitcast=True) - 8388736.0,
                b2.to(tl.float32, bitcast=True) - 8388736.0, b3.to(tl.float32, bitcast=True) - 8388736.0)

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

    # Tuned per power of two of rows (M_BUCKET), not per row count: prompts of every length (a server's, a chat's)
    # would otherwise each pay a tuning run of every configuration.
    @triton.autotune(configs=[triton.Config({**c.kwargs, "BLOCK_K": 128 if c.kwargs["BLOCK_M"] <= 32 else 64},
                                            num_warps=c.num_warps, num_stages=c.num_stages) for c in _ROWS_CONFIGS],
                     key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _int8_rows(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, M_BUCKET,
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

    # Dequantization into a temporary weight, for products of more rows (the prefill's image positions), which
    # then run at cuBLAS's rate.
    @triton.jit
    def _int8_dequantize(w_ptr, s_ptr, out_ptr, numel, K, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < numel
        w = _int8_to_f32(tl.load(w_ptr + i, mask=ok, other=0)) * tl.load(s_ptr + i // K, mask=ok, other=0.0).to(
            tl.float32)
        tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=ok)

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


def launch(kernel, grid, wrap, *args, **options) -> None:
    """An autotuned kernel's launch; options: more keyword arguments (`decode_kernels.launch_options`)."""
    if INTERPRETED:  # (the kernel's own pruning of its list first, as its autotuner does)
        configs, prune = kernel.configs, getattr(kernel, "early_config_prune", None)
        configs = prune(configs, dict(zip(kernel.arg_names, args))) if prune else configs
        config = configs[interpreted_config % len(configs)].all_kwargs()
        kernel.fn[grid(config)](*args, **config, **options)
    else:
        wrap(kernel)[grid](*args, **options)


_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}


def counters(device: torch.device, n: int, owner: str) -> torch.Tensor:
    """n zeroed int32 counters for a kernel whose last program to finish a piece of work resets its counter to 0:
    one buffer per device and `owner`, kept (no fill kernel per call; the calls of one owner run one at a time, in
    stream order). While a CUDA graph is being captured a new buffer's fill would not run before the graph does, so
    one that must grow then is made per call, its fill recorded in the graph."""
    if torch.compiler.is_compiling():  # (traced code gets its own buffer, never a kept one)
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (torch.device(device), owner)
    have = _COUNTERS.get(key)
    if have is not None and have.numel() >= n:
        return have
    buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    if type(buf) is torch.Tensor and not (buf.is_cuda and torch.cuda.is_current_stream_capturing()):
        _COUNTERS[key] = buf
    return buf


def launch_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, wrap=lambda k: k) -> torch.Tensor:
    """(M, K) @ int8 (N, K).T -> (M, N) in x's dtype. `wrap`: how to launch (`wrap_triton` inside the custom op)."""
    (M, K), N = x.shape, weight.shape[0]
    y = x.new_empty(M, N)
    if M == 1:
        launch(_int8_row, lambda c: (triton.cdiv(N, c["BLOCK_N"]),), wrap, x[0], weight, scales, y[0], N, K)
    else:
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))  # noqa: E731
        bucket = next(b for b in (2, 4, 8, 16, 32, MAX_ROWS) if M <= b or b == MAX_ROWS)  # (comparisons only:
        # M may be a symbolic size inside compiled layers)
        launch(_int8_rows, grid, wrap, x, weight, scales, y, M, N, K, bucket)
    return y


def launch_int8_dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                           wrap=lambda k: k) -> torch.Tensor:
    """int8 codes x per-channel scales -> the (N, K) weight in `dtype` (computed in fp32, rounded once), one pass."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    wrap(_int8_dequantize)[(triton.cdiv(weight.numel(), 4096),)](weight, scales, out, weight.numel(),
                                                                 weight.shape[1], BLOCK=4096)
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
    def _int8_mm_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return launch_int8(x, weight, scales, torch.library.wrap_triton)

    @torch.library.triton_op("cogvlm::int8_dequantize", mutates_args=())
    def _int8_dequantize_op(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return launch_int8_dequantize(weight, scales, dtype, torch.library.wrap_triton)

    @torch.library.triton_op("cogvlm::int4_dequantize", mutates_args=())
    def _int4_dequantize_op(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                            dtype: torch.dtype) -> torch.Tensor:
        return launch_int4_dequantize(nibbles, scales, zeros, dtype, torch.library.wrap_triton)


# What the layers call: the custom op inside compiled code (so the compiler traces it), a plain launch otherwise (the
# op's dispatch cost ~100 us of host time per call on an H200's host, ~60 ms of an int8 prefill's 500 calls).
def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    compiling = torch.compiler.is_compiling()
    return torch.ops.cogvlm.int8_mm(x, weight, scales) if compiling else launch_int8(x, weight, scales)


def int8_dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    compiling = torch.compiler.is_compiling()
    return (torch.ops.cogvlm.int8_dequantize(weight, scales, dtype) if compiling
            else launch_int8_dequantize(weight, scales, dtype))


def int4_dequantize(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    compiling = torch.compiler.is_compiling()
    return (torch.ops.cogvlm.int4_dequantize(nibbles, scales, zeros, dtype) if compiling
            else launch_int4_dequantize(nibbles, scales, zeros, dtype))
