"""Compiled layers: inductor turns each ViT block and each decoder layer into a few fused kernels.

Eager PyTorch runs every cast, norm, residual add, rotary and gating op as a kernel of its own. Measured on an H200
(docs/benchmarks.md) they are about a third of a batch-1 prefill and about 1 ms of each decode step. `compile_layers`
compiles every ViT block and decoder layer with `torch.compile`, one block at a time as torchtune does: the blocks
are identical, so one compiled graph serves them all and compile time does not grow with depth. A decode session
then records the compiled decoder layers into its CUDA graph.

Compiling costs seconds once per process and batch size (on an H200 the first caption batch of 32 took 11.2 s
instead of 3.8), so it pays for long jobs: `cogvlm caption` turns it on for CUDA models; a one-off `ask` stays
eager, and so does the server for now (its engine's steps over changing rows and windows would recompile). The model
files are not touched: only each block's `forward` is replaced, and `uncompile_layers` puts it back. If compilation
fails (no Triton, an unsupported op) the block warns once and runs eagerly. `COGVLM_COMPILE=0` turns it off.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .kept import release_session

COMPILED = "_cogvlm_eager_forward"  # where a compiled block keeps its eager forward


def compile_wanted(model: nn.Module) -> bool:
    """Whether compiling pays and can work here: a CUDA model, Triton importable, COGVLM_COMPILE not 0."""
    if os.environ.get("COGVLM_COMPILE", "1") == "0" or not isinstance(model, nn.Module):
        return False
    if next(model.parameters()).device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.vision.layers, *model.llm.layers]


def compile_layers(model: nn.Module, backend: str | object = "inductor") -> nn.Module:
    """Compile each ViT block and decoder layer of `model` in place; returns the model. Calling it again does
    nothing; a kept decode session is dropped (its graph recorded the eager layers). `backend`: torch.compile's
    (tests pass their own)."""
    keep_addmm_fused()
    for block in blocks(model):
        if COMPILED in block.__dict__:
            continue
        eager = block.forward
        block.__dict__[COMPILED] = eager
        block.forward = _guarded(torch.compile(eager, dynamic=True, backend=backend), eager, type(block).__name__)
    release_session(model)
    return model


def keep_addmm_fused() -> None:
    """Keep inductor from splitting a bf16/fp16 `addmm` (a linear layer with a bias) into a matmul and a separate bias
    add when only element-wise ops follow: that rounds the product to bf16 before the bias is added, one extra
    rounding per such layer (the ViT's four linears, the vision expert's QKV), which compounds over 63 layers (a
    candidate cause of the compiled layers' 7.60 % from fp32 against 6.62 % eager on an H200 with torch 2.11,
    bench/accuracy.py; not confirmed). Newer torch keeps half-precision addmm fused by default
    (`keep_addmm_fused_for_half_dtypes`); for older ones the rewrite's check is wrapped to refuse bf16/fp16 inputs,
    as the newer check does."""
    import torch._inductor.config as inductor

    if hasattr(inductor, "keep_addmm_fused_for_half_dtypes"):
        inductor.keep_addmm_fused_for_half_dtypes = True
        return
    try:
        from torch._inductor.fx_passes import post_grad
        gate_half_dtypes(post_grad.pass_patterns[2], post_grad.unfuse_bias_add_to_pointwise)
    except (ImportError, AttributeError, IndexError, KeyError):  # another torch layout: nothing to change
        pass


def gate_half_dtypes(patterns, handler) -> int:
    """Wrap the extra check of every entry of `patterns` (an inductor PatternMatcherPass) that runs `handler` so that
    it never matches an addmm whose bias is bf16/fp16; returns how many entries were wrapped (once each)."""
    wrapped = 0
    for entries in patterns.patterns.values():
        for entry in entries:
            if getattr(entry, "handler", None) is not handler or getattr(entry.extra_check, "_cogvlm_gated", False):
                continue
            entry.extra_check = _refuse_half(entry.extra_check)
            wrapped += 1
    return wrapped


def _refuse_half(check):
    def gated(match) -> bool:
        value = match.kwargs["inp"].meta.get("val")
        if getattr(value, "dtype", None) in (torch.bfloat16, torch.float16):
            return False
        return check(match)

    gated._cogvlm_gated = True
    return gated


def uncompile_layers(model: nn.Module) -> nn.Module:
    """Undo `compile_layers` (e.g. to time eager against compiled in one process)."""
    for block in blocks(model):
        if COMPILED in block.__dict__:
            del block.__dict__["forward"]
            del block.__dict__[COMPILED]
    release_session(model)
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(COMPILED in block.__dict__ for block in blocks(model))


_failed: set[str] = set()  # block kinds whose compilation failed: they run eagerly from then on


def _guarded(compiled, eager, kind: str):
    def forward(*args, **kwargs):
        if kind in _failed:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compiler failure: the same block, eagerly
            if not _is_compiler_error(e):
                raise
            _failed.add(kind)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(f"torch.compile of {kind} failed ({type(e).__name__}: {reason}); running it eagerly")
            return eager(*args, **kwargs)

    return forward


def _is_compiler_error(e: Exception) -> bool:
    """Errors raised by dynamo/inductor/triton, not by the computation itself (a bad shape, out of memory)."""
    module = type(e).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "triton"))
