"""Triton kernels for the batch-1 decode step (`cogvlm.fast_decode`): a decoder layer in seven kernels instead of ~15.

A batch-1 decode step reads every language-path weight once; measured on an H200 (docs/benchmarks.md) the weight
products ran at ~90 % of copy bandwidth, but the ~10 small kernels around them per layer (two RMSNorms, residual
adds, the SwiGLU gate, rotary, three cache writes, the attention mask, cuBLAS's split-K reductions) and attention
over the cache cost ~0.9 ms of a 4.7 ms step. Here the small work moves into the products' first and last lines:

- `gemv(x, w)`: y = x @ w.T for one row, reading w once (bf16/fp16/fp32 weights, or int8 codes + per-channel
  scales, read as bytes or, an autotuning option, as int32 words of four codes). Options: `norm=(weight, eps)`
  applies RMSNorm to x on the fly (the sum of squares is accumulated in the same pass and applied at the end:
  y = rsqrt(mean(x^2) + eps) * (w @ (weight * x)), which skips the rounding of the normalized x to bf16 that the
  eager layer does); `gate=True` reads w as [gate | up] and returns silu(g) * u;
  `residual=r` returns r + y in r's dtype (the fp32 residual stream) after rounding y to the weight's dtype, as the
  layer's `x + sublayer(x)` does.
- `rope_kv(qkv, cos, sin, k_cache, v_cache, pos)`: rotary on q and k, k and v written to cache slot `pos`, q out.
- `add_norm(x, y, weight, eps)`, `silu_gate(gate_up)`: the residual add with the next RMSNorm, and the SwiGLU gate,
  of a few rows in one kernel each (eager takes five and two), around the products that run through their own
  modules (cuBLAS at batches 2-16, int4 or LoRA layers at batch 1).
- `attend(q, k_cache, v_cache, key_valid, pos)`: attention of one query per row and head over the cache slots
  that are valid and not after `pos`, split over the cache (flash decoding: each program a chunk of slots, then a
  short combine), so that 32 heads keep every SM reading; invalid slots are never loaded.

On GPUs of compute capability 9.0+ they are launched with programmatic dependent launch (`launch_options`;
`COGVLM_PDL=0` turns it off): a kernel's programs may start while the previous kernel's last ones still run, and
wait for its writes (`_wait_for_inputs`) only after the work that does not need them, a product's first weight tile.
Measured on an H200 (bench/decode_step.py, docs/benchmarks.md): the bf16 batch-1 step 4010 -> 3843 us, int8 2820 ->
2753 us. (Asking L2 for each program's whole weight range at its start, tried with it, made the step slower: 4738
us.)

They run in Triton's CPU interpreter too (tests, `TRITON_INTERPRET=1`), without PDL.
"""
from __future__ import annotations

import functools
import os

import torch

from .quantize.triton_mm import INTERPRETED, triton

if triton is not None:
    import triton.language as tl

    from .quantize.triton_mm import _int8_to_f32, _word_codes_to_f32, launch

    def _configs(rows):
        """(BLOCK_N, BLOCK_K, warps, stages[, WORDS]) -> configs; WORDS: int8 codes read as int32 words of four."""
        return [triton.Config({"BLOCK_N": r[0], "BLOCK_K": r[1], "WORDS": len(r) > 4 and r[4]}, num_warps=r[2],
                              num_stages=r[3]) for r in rows]

    def _prune(configs, named_args, **kwargs):
        """WORDS configurations only for int8 codes with K % 4 == 0 (for other weights they repeat the plain ones)."""
        words = named_args["INT8"] and named_args["K"] % 4 == 0
        return [c for c in configs if words or not c.kwargs["WORDS"]]

    @triton.jit
    def _weight_tile(w_ptr, rn, n_ok, k0, N, K, GATE: tl.constexpr, WORDS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The (BLOCK_N, BLOCK_K) weight tile at input k0 (int32 words of four int8 codes with WORDS, BLOCK_K / 4 of
        them), and the up tile of the same channels with GATE; past K, nothing is read."""
        if WORDS:  # K % 4 == 0: a word holds codes 4j..4j+3, code 4j+b in byte b
            j = k0 // 4 + tl.arange(0, BLOCK_K // 4)
            offsets, ok = rn[:, None] * (K // 4) + j[None, :], n_ok[:, None] & (j[None, :] < K // 4)
            w32 = w_ptr.to(tl.pointer_type(tl.int32))
            w, up_ptr = tl.load(w32 + offsets, mask=ok, other=0), w32 + N * (K // 4)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            offsets, ok = rn[:, None] * K + rk[None, :], n_ok[:, None] & (rk[None, :] < K)
            w, up_ptr = tl.load(w_ptr + offsets, mask=ok, other=0), w_ptr + N * K
        u = tl.load(up_ptr + offsets, mask=ok, other=0) if GATE else w  # the up row of a channel: N rows further
        return w, u

    @triton.jit
    def _wait_for_inputs(PDL: tl.constexpr):
        """With programmatic dependent launch (`launch_options`): wait until the previous kernel's writes are visible,
        and let the next kernel's programs start (their own work before their wait: loading their weights)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    # (BLOCK_N, BLOCK_K, warps, stages[, WORDS]): the first eight are the int8 product's (`triton_mm._int8_row`);
    # WORDS were the fastest at all four int8 shapes on an H200 once their codes became floats by byte permutes
    # (bench/gemv_configs.py, docs/benchmarks.md)
    @triton.autotune(configs=_configs([(4, 512, 2, 1), (8, 512, 4, 1), (16, 256, 4, 1), (16, 512, 4, 3),
                                       (32, 256, 4, 1), (8, 1024, 4, 1), (16, 1024, 8, 1), (32, 512, 8, 3),
                                       (4, 512, 2, 3), (8, 512, 4, 3), (16, 256, 4, 3), (32, 256, 4, 3),
                                       (8, 1024, 4, 2), (32, 128, 4, 4), (64, 128, 8, 3),
                                       (8, 2048, 4, 1, True), (8, 1024, 4, 1, True), (16, 1024, 4, 1, True),
                                       (8, 512, 4, 1, True), (16, 512, 4, 1, True), (4, 2048, 2, 1, True),
                                       (16, 512, 2, 1, True)]),
                     key=["N", "K", "NORM", "GATE", "RESIDUAL", "INT8"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _gemv(x_ptr, w_ptr, s_ptr, nw_ptr, r_ptr, y_ptr, N, K, eps, NORM: tl.constexpr, GATE: tl.constexpr,
              RESIDUAL: tl.constexpr, INT8: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, WORDS: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels (of the gate half with GATE)
        n_ok = rn < N
        # The weights do not depend on the previous kernel: the first tile is read before waiting for it (with PDL,
        # while that kernel's last programs still run); each step then reads the next tile after its arithmetic.
        w, u = _weight_tile(w_ptr, rn, n_ok, 0, N, K, GATE, INT8 and WORDS, BLOCK_K)
        _wait_for_inputs(PDL)
        if INT8 and WORDS:
            KW: tl.constexpr = BLOCK_K // 4
            acc = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
            squares = tl.zeros((KW,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                j = k0 // 4 + tl.arange(0, KW)
                j_ok = j < K // 4
                codes = _word_codes_to_f32(w)
                codes_up = _word_codes_to_f32(u) if GATE else codes
                for b in tl.static_range(4):
                    x = tl.load(x_ptr + 4 * j + b, mask=j_ok, other=0.0).to(tl.float32)
                    if NORM:
                        squares += x * x
                        x = x * tl.load(nw_ptr + 4 * j + b, mask=j_ok, other=0.0).to(tl.float32)
                    acc += codes[b] * x[None, :]
                    if GATE:
                        acc_up += codes_up[b] * x[None, :]
                w, u = _weight_tile(w_ptr, rn, n_ok, k0 + BLOCK_K, N, K, GATE, True, BLOCK_K)
            y, up = tl.sum(acc, axis=1), tl.sum(acc_up, axis=1)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                x = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                if NORM:
                    squares += x * x
                    x = x * tl.load(nw_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                acc += (_int8_to_f32(w) if INT8 else w.to(tl.float32)) * x[None, :]
                if GATE:
                    acc_up += (_int8_to_f32(u) if INT8 else u.to(tl.float32)) * x[None, :]
                w, u = _weight_tile(w_ptr, rn, n_ok, k0 + BLOCK_K, N, K, GATE, False, BLOCK_K)
            y, up = tl.sum(acc, axis=1), tl.sum(acc_up, axis=1)
        if INT8:
            y *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            if GATE:
                up *= tl.load(s_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)
        _finish(y, up, tl.sum(squares, axis=0), x_ptr, r_ptr, y_ptr, rn, n_ok, K, eps, NORM, GATE, RESIDUAL)

    @triton.jit
    def _finish(y, up, squares, x_ptr, r_ptr, y_ptr, rn, n_ok, K, eps, NORM: tl.constexpr, GATE: tl.constexpr,
                RESIDUAL: tl.constexpr):
        """A one-row product's last lines (`_gemv`, `decode_int4`): the fp32 sums y (and up, with GATE) of channels
        rn times the RMSNorm's scale from x's sum of squares, the SwiGLU gate, the residual add, the store."""
        if NORM:
            y *= tl.rsqrt(squares / K + eps)
            if GATE:
                up *= tl.rsqrt(squares / K + eps)
        if GATE:
            gate = y.to(y_ptr.dtype.element_ty).to(tl.float32)  # the products in the layer's dtype, as eager
            up = up.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = gate * tl.sigmoid(gate) * up
        if RESIDUAL:  # (x is then the sublayer's input, in the layer's dtype)
            y = tl.load(r_ptr + rn, mask=n_ok, other=0.0).to(tl.float32) + y.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _rope_kv(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, H, S,
                 HALF: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        _wait_for_inputs(PDL)
        b, h = tl.program_id(0), tl.program_id(1)
        j = tl.arange(0, BLOCK)
        ok = j < HALF
        c = tl.load(cos_ptr + b * HALF + j, mask=ok, other=0.0)
        s = tl.load(sin_ptr + b * HALF + j, mask=ok, other=0.0)
        row = qkv_ptr + b * 6 * H * HALF  # [q | k | v], each (H, 2 * HALF)
        q1 = tl.load(row + h * 2 * HALF + j, mask=ok, other=0.0).to(tl.float32)
        q2 = tl.load(row + h * 2 * HALF + HALF + j, mask=ok, other=0.0).to(tl.float32)
        k1 = tl.load(row + (H + h) * 2 * HALF + j, mask=ok, other=0.0).to(tl.float32)
        k2 = tl.load(row + (H + h) * 2 * HALF + HALF + j, mask=ok, other=0.0).to(tl.float32)
        v1 = tl.load(row + (2 * H + h) * 2 * HALF + j, mask=ok, other=0.0)
        v2 = tl.load(row + (2 * H + h) * 2 * HALF + HALF + j, mask=ok, other=0.0)
        out = q_ptr + (b * H + h) * 2 * HALF
        tl.store(out + j, (q1 * c - q2 * s).to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(out + HALF + j, (q2 * c + q1 * s).to(q_ptr.dtype.element_ty), mask=ok)
        slot = ((b * H + h) * S + tl.load(pos_ptr)) * 2 * HALF
        tl.store(k_ptr + slot + j, (k1 * c - k2 * s).to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(k_ptr + slot + HALF + j, (k2 * c + k1 * s).to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(v_ptr + slot + j, v1, mask=ok)
        tl.store(v_ptr + slot + HALF + j, v2, mask=ok)

    @triton.jit
    def _add_norm_rows(x_ptr, y_ptr, w_ptr, sum_ptr, h_ptr, D, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
        _wait_for_inputs(PDL)
        row = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        ok = d < D
        x = tl.load(x_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
        if ADD:  # the residual add, in fp32 as the layer's x + sublayer(x)
            x += tl.load(y_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
            tl.store(sum_ptr + row * D + d, x, mask=ok)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * D + d, (w * (x * r)).to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_gate_rows(gu_ptr, y_ptr, F, BLOCK: tl.constexpr, PDL: tl.constexpr):
        _wait_for_inputs(PDL)
        row = tl.program_id(0)
        f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = f < F
        g = tl.load(gu_ptr + row * 2 * F + f, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * F + F + f, mask=ok, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)  # F.silu, rounded as eager rounds it
        tl.store(y_ptr + row * F + f, (silu * u).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.autotune(configs=[triton.Config({"BLOCK_S": b}, num_warps=w) for b, w in
                              ((64, 4), (32, 2), (32, 4), (16, 2), (64, 8), (16, 1))], key=["S", "CHUNK", "D"])
    @triton.jit
    def _attend_chunk(q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, H, S, CHUNK, scale,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr, BLOCK_S: tl.constexpr):
        _wait_for_inputs(PDL)
        bh, c = tl.program_id(0), tl.program_id(1)
        n_chunks = tl.num_programs(1)
        b = bh // H
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + bh * D + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        pos = tl.load(pos_ptr)
        m = tl.max(tl.full((BLOCK_S,), -1e30, tl.float32), axis=0)  # running max (a float scalar)
        l = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)  # running sum of exp
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for s0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            valid = (s < S) & (s <= pos)
            valid = valid & ((tl.load(valid_ptr + b * S + s, mask=valid, other=0) != 0) | (s == pos))
            offsets = (bh * S + s)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + offsets, mask=valid[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptr + offsets, mask=valid[:, None] & d_ok[None, :], other=0.0)  # (both loads in flight)
            scores = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -1e30)
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.where(valid, tl.exp(scores - m_new), 0.0)
            alpha = tl.exp(m - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l = l * alpha + tl.sum(p, axis=0)
            m = m_new
        part = bh * n_chunks + c
        tl.store(o_ptr + part * D + d, acc, mask=d_ok)
        tl.store(m_ptr + part, m)
        tl.store(l_ptr + part, l)

    @triton.jit
    def _attend_combine(o_ptr, m_ptr, l_ptr, out_ptr, n_chunks, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        _wait_for_inputs(PDL)
        bh = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        c_ok = c < n_chunks
        d = tl.arange(0, BLOCK_D)
        m = tl.load(m_ptr + bh * n_chunks + c, mask=c_ok, other=-1e30)
        weight = tl.where(c_ok, tl.exp(m - tl.max(m, axis=0)), 0.0)
        total = tl.sum(weight * tl.load(l_ptr + bh * n_chunks + c, mask=c_ok, other=0.0), axis=0)
        o = tl.load(o_ptr + (bh * n_chunks + c)[:, None] * D + d[None, :], mask=c_ok[:, None] & (d[None, :] < D),
                    other=0.0)
        tl.store(out_ptr + bh * D + d, (tl.sum(o * weight[:, None], axis=0) / total).to(out_ptr.dtype.element_ty),
                 mask=d < D)


PDL = os.environ.get("COGVLM_PDL", "1") != "0"


def launch_options(device: torch.device, rows: int = 1) -> dict:
    """The kernels' PDL argument and launch option: programmatic dependent launch for a one-row step on GPUs that
    have it (compute capability 9.0+), unless COGVLM_PDL=0. Each kernel of the step may then start while the previous
    one finishes, reading what does not depend on it (a product's first weight tile) before it waits
    (`_wait_for_inputs`). (At 8 rows, where the products run in their modules, it gained nothing for bf16 and slowed
    the int8 step by 1.7 %.)"""
    on = (PDL and not INTERPRETED and device.type == "cuda" and rows == 1
          and torch.cuda.get_device_capability(device)[0] >= 9)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


# Configurations measured faster than the autotuner's pick, per GPU and (N, K, NORM, GATE, RESIDUAL, INT8). The
# autotuner times one launch at a time from a cold cache; a decode step runs its products back to back, each
# starting under the previous one's tail (PDL), as bench/gemv_configs.py times them. On an H200 it found int8 QKV
# (with the norm) 10 % faster in this configuration than in the autotuned one (docs/benchmarks.md, 2026-12-04).
MEASURED = {"NVIDIA H200": {(12288, 4096, True, False, False, True): (16, 512, 2, 1, True)}}
USE_MEASURED = os.environ.get("COGVLM_GEMV_MEASURED", "1") != "0"


def measured_key(N: int, K: int, norm: bool, gate: bool, residual: bool, int8: bool) -> tuple:
    """A product's key in MEASURED: N output channels (of the gate half with gate), K inputs, and its options."""
    return N, K, norm, gate, residual, int8


def measured_entries(device: torch.device, table: dict, make) -> dict:
    """This GPU's entries of a table like MEASURED, as `triton.Config`s by `make` ({} elsewhere, in the
    interpreter, or with COGVLM_GEMV_MEASURED=0)."""
    if INTERPRETED or not USE_MEASURED or device.type != "cuda":
        return {}
    rows = table.get(torch.cuda.get_device_name(device), {})
    return dict(zip(rows, make(list(rows.values()))))


@functools.lru_cache(maxsize=None)
def measured_configs(device: torch.device) -> dict:
    """This GPU's entries of MEASURED, as `triton.Config`s."""
    return measured_entries(device, MEASURED, _configs)


def gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, norm=None, gate: bool = False,
         residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, config=None) -> torch.Tensor:
    """(K,) x, (N, K) weight (or int8 codes with (N,) `scales`) -> (N,) y; with gate, weight is (2N', K) and y (N',).
    norm: (norm_weight (K,), eps) or None; residual: (N,) added at the end (y then has its dtype). config: a
    `triton.Config` to launch with (default: this GPU's measured one for the shape, else the autotuned one;
    bench/gemv_configs.py)."""
    K = x.shape[-1]
    N = weight.shape[0] // 2 if gate else weight.shape[0]
    dtype = residual.dtype if residual is not None else out_dtype or (scales.dtype if scales is not None
                                                                     else weight.dtype)
    y = torch.empty(N, dtype=dtype, device=x.device)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    int8 = weight.dtype == torch.int8
    args = (x, weight, scales if int8 else weight, norm_weight, residual if residual is not None else y, y, N, K, eps,
            norm is not None, gate, residual is not None, int8)
    grid = lambda c: (triton.cdiv(N, c["BLOCK_N"]),)  # noqa: E731
    if config is None:
        config = measured_configs(x.device).get(measured_key(N, K, norm is not None, gate, residual is not None, int8))
    if config is None:
        launch(_gemv, grid, lambda k: k, *args, **launch_options(x.device))
    else:
        _gemv.fn[grid(config.kwargs)](*args, **config.all_kwargs(), **launch_options(x.device))
    return y


def add_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(B, D) fp32 residual rows x plus the product y (or None) -> (x + y, RMSNorm(x + y)) in one kernel, the norm as
    `cogvlm.llm.rms_norm` computes it (fp32, out in the weight's dtype)."""
    B, D = x.shape
    total = x if y is None else torch.empty_like(x)
    h = torch.empty(B, D, dtype=weight.dtype, device=x.device)
    block = triton.next_power_of_2(D)
    _add_norm_rows[(B,)](x, x if y is None else y, weight, total, h, D, eps, ADD=y is not None, BLOCK=block,
                         num_warps=min(16, max(1, block // 256)), **launch_options(x.device, B))
    return total, h


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """(B, 2F) [gate | up] -> (B, F) silu(gate) * up in one kernel, rounded as the eager ops round."""
    B, F2 = gate_up.shape
    y = torch.empty(B, F2 // 2, dtype=gate_up.dtype, device=gate_up.device)
    _silu_gate_rows[(B, triton.cdiv(F2 // 2, 1024))](gate_up, y, F2 // 2, BLOCK=1024, num_warps=4,
                                                     **launch_options(gate_up.device, B))
    return y


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            pos: torch.Tensor) -> torch.Tensor:
    """qkv (B, 3 H hd); cos, sin (B, hd/2) fp32; caches (B, H, S, hd); pos (1,) long -> q (B, H, hd)."""
    B, H, S, hd = k_cache.shape
    q = torch.empty(B, H, hd, dtype=qkv.dtype, device=qkv.device)
    _rope_kv[(B, H)](qkv, cos, sin, pos, q, k_cache, v_cache, H, S, HALF=hd // 2,
                     BLOCK=triton.next_power_of_2(hd // 2), **launch_options(qkv.device, B))
    return q


CHUNK_STEP, MAX_CHUNKS = 64, 64  # a chunk is a multiple of CHUNK_STEP slots (and of every BLOCK_S)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_valid: torch.Tensor,
           pos: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over the valid slots up to pos; q (B, H, hd) -> (B, H, hd)."""
    B, H, S, hd = k_cache.shape
    # Chunks of 64 slots (768 programs for 32 heads and 1536 slots; a first version with ~2 programs per SM read the
    # cache at 1.2 TB/s on an H200), at most MAX_CHUNKS per head for long caches; each program walks its chunk in
    # blocks of the autotuned BLOCK_S. On an H200 (docs/benchmarks.md, eleventh session) chunks of 128-512 slots were
    # slower at batches 1, 8 and 16, and so was combining a row's chunks in the last of its programs to finish
    # instead of the second kernel (12.3 against 9.9 us at batch 1). Reading a chunk's first block of the cache before
    # waiting for rotary (PDL) made the bf16 step slower (4010 against 3846 us), and so did rotary and the cache
    # writes inside this kernel (3816 against 3795; 2026-12-04).
    n_chunks = min(triton.cdiv(S, CHUNK_STEP), MAX_CHUNKS)
    chunk = triton.cdiv(triton.cdiv(S, n_chunks), CHUNK_STEP) * CHUNK_STEP
    n_chunks = triton.cdiv(S, chunk)
    parts = torch.empty(B * H * n_chunks, hd, dtype=torch.float32, device=q.device)
    m = torch.empty(B * H * n_chunks, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    block_d = triton.next_power_of_2(hd)
    pdl = launch_options(q.device, B)
    launch(_attend_chunk, lambda c: (B * H, n_chunks), lambda k: k, q, k_cache, v_cache, key_valid, pos, parts, m, l,
           H, S, chunk, hd ** -0.5, hd, block_d, **pdl)
    out = torch.empty_like(q)
    _attend_combine[(B * H,)](parts, m, l, out, n_chunks, D=hd, BLOCK_D=block_d,
                              BLOCK_C=triton.next_power_of_2(n_chunks), **pdl)
    return out


__all__ = ["INTERPRETED", "add_norm", "attend", "gemv", "rope_kv", "silu_gate"]
