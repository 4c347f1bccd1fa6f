"""The ViT's MLP with its GELU inside the first product's epilogue (cuBLASLt), on CUDA in bf16/fp16 inference.

`VisionMLP` computes fc2(gelu(fc1(x))): cuBLAS writes fc1's (tokens, 15360) output, then a separate kernel reads it
back for the GELU and writes it again, 1.8 ms of a 21 ms ViT + adapter on an H200 (docs/benchmarks.md). cuBLASLt
can apply the GELU to the fp32 accumulator before the one rounding to bf16 (`torch._addmm_activation(...,
use_gelu=True)`): on an H200 at one image's shapes, 133 us instead of 156 us per block, and closer to fp32 (relative
error against the exact fp32 GELU 1.7e-3 instead of 2.6e-3), although cuBLASLt's GELU is the tanh approximation: it
differs from the exact (erf) GELU by at most ~5e-4, below bf16's rounding of the values it is applied to.

`fuse_vision_gelu(model)` swaps every `VisionMLP` for a `GeluEpilogueMLP` holding the same fc1 / fc2 modules (same
names, same state dict). It takes the fused path only where it applies (CUDA, bf16/fp16, plain `nn.Linear` fc1 with a
bias in the input's dtype, no autograd); elsewhere (the CPU, fp32, quantized or LoRA-wrapped fc1, training) it is
the ordinary exact MLP. Inside compiled layers it is a custom op, so that inductor keeps the epilogue instead of
splitting it into a product and a pointwise GELU. COGVLM_FUSED_GELU=0 keeps the ordinary MLP.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .swap import replace_modules
from .vit import VisionMLP


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


@torch.library.custom_op("cogvlm::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _product(x, weight, bias)


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) for (..., in) x, in one cuBLASLt call; the custom op only inside compiled code
    (its dispatch costs host time on every call)."""
    product = _linear_gelu_op if torch.compiler.is_compiling() else _product
    return product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)


class GeluEpilogueMLP(VisionMLP):
    """`VisionMLP` whose fc1 + GELU run as one product where that applies (see the module's doc)."""

    def __init__(self, mlp: VisionMLP):
        nn.Module.__init__(self)
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2

    def fused(self, x: torch.Tensor) -> bool:
        fc1 = self.fc1
        return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and type(fc1) is nn.Linear
                and fc1.bias is not None and fc1.weight.dtype == x.dtype and fc1.bias.dtype == x.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or fc1.weight.requires_grad))
                and not (fc1._forward_hooks or fc1._forward_pre_hooks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused(x):
            return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(F.gelu(self.fc1(x)))


def fuse_vision_gelu(model: nn.Module) -> list[str]:
    """Swap the ViT's MLPs for `GeluEpilogueMLP`s (idempotent); returns the swapped names."""
    if os.environ.get("COGVLM_FUSED_GELU", "1") == "0":
        return []
    todo = [n for n, m in model.vision.named_modules() if type(m) is VisionMLP]
    if not todo:
        return []
    return replace_modules(model, [f"vision.{n}" for n in todo], lambda name, mlp: GeluEpilogueMLP(mlp),
                           kind=VisionMLP, what="ViT MLP")
