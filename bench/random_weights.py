"""Full-size CogVLM with random weights, straight on the GPU: no checkpoint needed for benchmarks.

The distribution keeps every layer's activations in a realistic range (so bf16 rounding behaves as with real
weights): matrices N(0, 1/fan_in), norm weights N(1, 0.1), biases N(0, 0.05), lm_head N(0, 0.08),
embeddings and the learned boi/eoi/cls/position vectors N(0, 0.5).
"""
from __future__ import annotations

import torch
from torch import nn

from cogvlm.config import CogVLMConfig
from cogvlm.loading import set_parameter
from cogvlm.model import CogVLM


def init_(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if "norm" in name and name.endswith("weight"):
        return t.normal_(1.0, 0.1, generator=gen)
    if name.endswith("bias"):
        return t.normal_(0.0, 0.05, generator=gen)
    if name == "llm.lm_head.weight":
        return t.normal_(0.0, 0.08, generator=gen)
    if t.dim() >= 2 and not name.endswith(("embed.weight", "pos_embed", "cls_token", "boi", "eoi")):
        fan_in = t[0].numel()
        return t.normal_(0.0, fan_in**-0.5, generator=gen)
    return t.normal_(0.0, 0.5, generator=gen)


def random_model(cfg: CogVLMConfig, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> CogVLM:
    """Build on the meta device, then create each parameter on `device`, drawn in fp32 and cast."""
    with torch.device("meta"):
        model = CogVLM(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        t = init_(name, torch.empty(p.shape, device=device, dtype=torch.float32), gen)
        set_parameter(model, name, t.to(dtype))
    return model.eval()


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
