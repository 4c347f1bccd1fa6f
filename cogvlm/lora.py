"""LoRA (low-rank adaptation) as a module swap, and the name patterns used to pick modules and parameters.

`apply_lora(model, targets, rank, alpha, dropout)` replaces each chosen `nn.Linear` by a `LoRALinear`, which
computes `x W^T + b + (alpha / rank) * dropout(x) A^T B^T` with a trainable A (rank x in, Kaiming-uniform) and
B (out x rank, zeros, so a fresh adapter changes nothing). `LoRALinear` is itself an `nn.Linear` that keeps the
wrapped layer's own `weight` and `bias` Parameters, so every original parameter keeps its name and code that reads
`.weight` still works; the adapters add `<module>.lora_A` and `<module>.lora_B`. `merge_lora(model)` folds
`(alpha / rank) B A` into each weight and swaps plain `nn.Linear`s back, so the model's state dict is again exactly
the checkpoint layout. Over a quantized layer (`cogvlm.quantize`: QLoRA) the adapter is a `QuantizedLoRALinear`,
which keeps the frozen quantized layer as `base` and merges into an `nn.Linear` of its dequantized weight.

Targets are chosen with the name patterns of `cogvlm.swap`.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .quantize.linear import QuantizedLinear
from .swap import replace_modules, set_submodule

DEFAULT_TARGETS = ("vision_expert_qkv", "vision_expert_dense")


# ------------------------------------------------------------------------------------------------------ modules
class LoRALinear(nn.Linear):
    """An `nn.Linear` plus a low-rank update; holds the wrapped layer's own weight/bias Parameters (no copy)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: we adopt base's parameters instead of creating new ones
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype = dtype or (base.weight.dtype if base.weight.is_floating_point() else torch.float32)
        kw = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and the LoRA reference
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        a = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            a = a.to(self.lora_A.dtype)
        delta = F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32 update that merging adds to the weight."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W + scaling * B A (computed in fp32), same Parameter objects."""
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


class QuantizedLoRALinear(LoRALinear):
    """LoRA over a frozen quantized layer (QLoRA): `base(x) + (alpha / rank) * dropout(x) A^T B^T`, the adapters in the
    compute dtype. The base keeps its quantized buffers (as `<module>.base.*`); the adapters are `<module>.lora_A/B`,
    named as over an `nn.Linear`."""

    def __init__(self, base: QuantizedLinear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        scales = next(t for t in base.buffers() if t.is_floating_point())  # on the device, in the compute dtype
        like = SimpleNamespace(in_features=base.in_features, out_features=base.out_features, bias=None,
                               weight=torch.empty(0, device=scales.device, dtype=scales.dtype))
        super().__init__(like, rank, alpha, dropout, dtype)
        del self.weight, self.bias  # the base computes those
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        a = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            a = a.to(self.lora_A.dtype)
        delta = F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling
        return out + delta.to(out.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear of the dequantized weight plus scaling * B A (in fp32, then the compute dtype): the
        function that was trained."""
        w = self.base.dequantize(torch.float32) + self.delta_weight().to(self.lora_A.device)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device="meta")
        linear.weight = nn.Parameter(w.to(self.base.dequantize().dtype), requires_grad=False)
        if self.base.bias is not None:
            linear.bias = self.base.bias
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Wrap every nn.Linear selected by `targets` in a LoRALinear; returns the wrapped module names.

    The adapters' A and B are trainable (requires_grad=True); nothing else changes its requires_grad. `dtype` is the
    adapters' dtype (default: the wrapped weight's). Each pattern must select at least one linear layer.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")

    def make(name: str, base: nn.Module) -> LoRALinear:
        kind = QuantizedLoRALinear if isinstance(base, QuantizedLinear) else LoRALinear
        lora = kind(base, rank, alpha, dropout, dtype)
        lora.lora_A.requires_grad_(True)
        lora.lora_B.requires_grad_(True)
        return lora

    return replace_modules(model, targets, make, kind=(nn.Linear, QuantizedLinear))


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRALinear into its weight and swap a plain nn.Linear back; returns the merged module names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).merged_linear())
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, by their names in the model (`...vision_expert_qkv.lora_A`, `...lora_B`)."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
