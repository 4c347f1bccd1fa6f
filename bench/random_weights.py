"""Full-size CogVLM with random weights, straight on the GPU: no checkpoint needed for benchmarks.

The distribution is the one issue 7 prescribes for the bf16-vs-fp32 comparison: every matrix (embeddings and the
learned boi/eoi/cls/position tables included) N(0, 1/fan_in) with fan_in its row length, norm weights N(1, 0.1),
biases N(0, 0.05), lm_head N(0, 0.08). Values are drawn in fp32 and rounded to bf16, so an fp32 model and a bf16
model made with the same seed hold exactly the same weights.
"""
from __future__ import annotations

import torch
from torch import nn

from cogvlm.config import CogVLMConfig
from cogvlm.loading import set_tensor
from cogvlm.meta import meta_device
from cogvlm import CogVLM


def init_(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if "norm" in name and name.endswith("weight"):
        return t.normal_(1.0, 0.1, generator=gen)
    if name.endswith("bias"):
        return t.normal_(0.0, 0.05, generator=gen)
    if name == "llm.lm_head.weight":
        return t.normal_(0.0, 0.08, generator=gen)
    return t.normal_(0.0, t[0].numel() ** -0.5, generator=gen)  # (conv kernels: fan_in = in_ch * k * k)


def random_model(cfg: CogVLMConfig, device="cuda", dtype=torch.bfloat16, seed: int = 0, place=None) -> CogVLM:
    """Build on the meta device, then create each parameter on `device` (drawn in fp32, rounded to bf16).

    `place(name) -> device`, if given, moves each parameter to its own device after drawing it on `device`, so a
    split model holds exactly the weights of the single-device one made with the same seed."""
    with meta_device():
        model = CogVLM(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        t = init_(name, torch.empty(p.shape, device=device, dtype=torch.float32), gen).bfloat16().to(dtype)
        set_tensor(model, name, t if place is None else t.to(place(name)))
    return model.eval()


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
