"""Kernel fusion for the small element-wise chains of the model (RMSNorm, rotary, SiLU-gating) on GPUs.

In eager PyTorch each of these is 5-10 separate kernels; at batch-1 decoding they cost more time than reading the
weights. `fused(fn)` returns a drop-in for a pure tensor function that runs `torch.compile(fn, dynamic=True)` on
small CUDA tensors (one generated kernel, compiled once for all shapes and reused by every layer) and the plain function
everywhere else. If compilation is unavailable (no Triton, say) it warns once and stays eager. Set COGVLM_COMPILE=0
to turn it off. The model files call these functions like any other; they never see the compiler.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


# Fuse only small tensors (decode steps, up to batch ~32): there the separate kernels are launch-bound and the
# compiled kernel runs inside the decode step's CUDA graph. For a long prefill the eager kernels are already
# bandwidth-bound, and the compiled function's per-call guard checks on the host would cost more than they save.
MAX_FUSED_NUMEL = 2**20


def fused(fn):
    compiled = None
    enabled = os.environ.get("COGVLM_COMPILE", "1") != "0"

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args):
        nonlocal compiled, enabled
        if not (enabled and x.is_cuda and x.numel() <= MAX_FUSED_NUMEL):
            return fn(x, *args)
        try:
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            return compiled(x, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same function, eager
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); running it eagerly")
            enabled = False
            return fn(x, *args)

    return wrapper
