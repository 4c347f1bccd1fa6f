"""Kernel fusion for the small element-wise chains of the model (RMSNorm, rotary, SiLU-gating) in decode steps.

In eager PyTorch each of these is 5-10 separate kernels; in a batch-1 decode step they cost more time than reading
the weights. `fused(fn)` returns a drop-in for a pure tensor function: inside `fused_kernels()` and on CUDA tensors
it runs `torch.compile(fn, dynamic=True)` (one generated kernel, compiled once for all shapes and reused by every
layer), everywhere else the plain function. `DecodeSession` turns it on only while it warms up and captures its
CUDA graph, so the compiled kernels are replayed with no host work; eager calls (prefill, training, CPU) never pay
a compiled function's per-call host overhead. If compilation is unavailable (no Triton, say) it warns once and
stays eager. Set COGVLM_COMPILE=0 to turn it off. The model files never see the compiler.
"""
from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager

import torch

_active = False  # set by fused_kernels()
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # (torch < 2.3 has no such function)


@contextmanager
def fused_kernels():
    global _active
    previous, _active = _active, True
    try:
        yield
    finally:
        _active = previous


def fused(fn=None, *, static: tuple[int, ...] = ()):
    """`@fused` or `@fused(static=(1, 2))`: the arguments at those positions are weights, compiled for their exact
    shapes (one graph per weight shape, the others dynamic): inductor's index arithmetic over symbolic weight sizes
    made the int4 dequantization (and an earlier compiled int8 product) several times slower."""
    if fn is None:
        return functools.partial(fused, static=static)
    compiled = None
    enabled = os.environ.get("COGVLM_COMPILE", "1") != "0"

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args):
        nonlocal compiled, enabled
        if not (_active and enabled and x.is_cuda) or _is_compiling():  # (inside a compiled layer: traced as is)
            return fn(x, *args)
        try:
            if compiled is None:
                if static:
                    _allow_recompiles(64)  # a model has a dozen weight shapes
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            for i in static:
                torch._dynamo.mark_static((x, *args)[i])
            return compiled(x, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same function, eager
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); running it eagerly")
            enabled = False
            return fn(x, *args)

    return wrapper


def _allow_recompiles(n: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # (torch < 2.6)
    setattr(config, name, max(getattr(config, name), n))
