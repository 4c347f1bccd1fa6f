"""Building the model to train: the base model (a converted checkpoint, or initialised from scratch), then what of
it trains (a preset, name patterns, LoRA adapters) and how (trainable dtype, gradient checkpointing).

`load_base(cfg)` is the one place a run's base model is made; a quantized frozen base (QLoRA: `--preset lora` over
int8/int4 linears) belongs there, as `load_model(..., prepare=swap_in_quantized_linears)` before any weight is read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import CONFIG_FILE, CogVLMConfig
from ..convert import TOKENIZER_FILE
from ..hub import resolve
from ..loading import load_model
from ..lora import DEFAULT_TARGETS, apply_lora
from ..model import CogVLM
from ..shards import parse_dtype
from ..swap import select
from .checkpoint import checkpoint_dtype
from .config import PRESETS, TrainConfig


def init_weights(model: CogVLM, seed: int = 0, std: float | None = None) -> CogVLM:
    """Initialise a model from scratch, reproducibly.

    Every weight matrix, conv kernel, embedding table and learned vector (cls, positions, boi, eoi) is drawn from
    N(0, std^2), by default with std = 1/sqrt(fan_in) (fan_in = the product of all but the first dimension: a
    linear layer's input width, a conv's in_channels x kernel area, an embedding's width); biases are 0,
    LayerNorm/RMSNorm weights 1. At CogVLM-17B's widths that std is 0.016-0.02, the usual 0.02. For a tiny model a
    fixed 0.02 is far too small: the adapter's SwiGLU, the product of two near-zero projections, then passes almost
    no signal, and a from-scratch model learns the Shapes colours but not the shapes.

    Values are drawn on the CPU in parameter-name order from one seeded generator, so they do not depend on the
    device or on the model's dtype."""
    gen = torch.Generator().manual_seed(seed)
    norm_params = set()
    for mname, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            norm_params.update(f"{mname}.{p}" for p, _ in module.named_parameters(recurse=False))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name in norm_params:
                value = torch.ones(p.shape) if name.endswith(".weight") else torch.zeros(p.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(p.shape)
            else:
                fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
                value = torch.randn(p.shape, generator=gen) * (std if std is not None else fan_in**-0.5)
            p.copy_(value.to(p.dtype))
    return model


def build_model(config: str | Path | CogVLMConfig, seed: int = 0, device=None, dtype=torch.float32,
                std: float | None = None) -> CogVLM:
    """A freshly initialised CogVLM (`init_weights`) from a config: a CogVLMConfig, one of our config files, a hub
    config.json, a folder holding either, or a preset name."""
    cfg = config if isinstance(config, CogVLMConfig) else CogVLMConfig.load(config)
    model = init_weights(CogVLM(cfg), seed, std)
    model.requires_grad_(False)
    return model.to(device=device).set_dtype(dtype).eval()


@dataclass
class Base:
    """A run's base model, everything frozen, and what exporting it again needs."""

    model: CogVLM
    tokenizer: Path  # tokenizer.model, copied into the export
    hf_config: dict | None  # the hub config.json kept for export_hf (None: made from the model's config)
    source_dtype: torch.dtype | None  # the dtype the source stores its weights in: the export's default


def load_base(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Base:
    """The model `cfg` fine-tunes: its `--model` checkpoint (a hub id or hub-layout folder is converted once), or a
    model built from `--init` with `init_weights(seed)`; weights and compute in `dtype`, nothing trainable yet."""
    if (cfg.model is None) == (cfg.init is None):
        raise ValueError("give exactly one of --model (a converted checkpoint) or --init (a config to train "
                         "from scratch)")
    if cfg.model is not None:
        folder = resolve(cfg.model, tokenizer=cfg.tokenizer)
        model = load_model(folder, device=device, dtype=dtype)
        hf_config = json.loads((folder / CONFIG_FILE).read_text()).get("hf_config")
        base = Base(model, Path(cfg.tokenizer or folder / TOKENIZER_FILE), hf_config, checkpoint_dtype(folder))
    else:
        init = Path(cfg.init)
        tokenizer = Path(cfg.tokenizer or (init if init.is_dir() else init.parent) / TOKENIZER_FILE)
        base = Base(build_model(cfg.init, cfg.seed, device, dtype), tokenizer, None, torch.float32)
    if not base.tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer {base.tokenizer} not found; pass --tokenizer PATH/tokenizer.model")
    return base


def select_trainable(
    model: CogVLM,
    preset: str = "experts",
    train: Sequence[str] = (),
    freeze: Sequence[str] = (),
    lora_targets: Sequence[str] = DEFAULT_TARGETS,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_dtype: torch.dtype | None = None,
) -> list[str]:
    """Set requires_grad by preset, then `train` patterns (made trainable), then `freeze` patterns (frozen);
    with preset "lora", first wrap the `lora_targets` layers. Returns the trainable parameter names."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "lora":
        apply_lora(model, lora_targets, lora_rank, lora_alpha, lora_dropout, lora_dtype)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    on = set(select(PRESETS[preset], names, "parameter")) if PRESETS[preset] else set()
    if preset == "lora":
        on |= {n for n in names if n.endswith((".lora_A", ".lora_B"))}
    on |= set(select(list(train), names, "parameter")) if train else set()
    on -= set(select(list(freeze), names, "parameter")) if freeze else set()
    for n in on:
        params[n].requires_grad_(True)
    trainable = [n for n in names if n in on]
    if not trainable:
        raise ValueError("no parameter is left to train (check --preset, --train and --freeze)")
    return trainable


def set_gradient_checkpointing(model: CogVLM, enabled: bool = True) -> None:
    """Recompute each ViT block and decoder layer in the backward pass instead of storing its activations."""
    model.vision.gradient_checkpointing = enabled
    model.llm.gradient_checkpointing = enabled


def make_trainable(model: CogVLM, cfg: TrainConfig) -> list[str]:
    """Apply `cfg`'s preset, patterns and LoRA options (`select_trainable`), keep the trained tensors in
    `cfg.trainable_dtype` (fp32 master weights by default, whatever the model's dtype), set gradient checkpointing,
    and put the model in training mode. Returns the trainable parameter names."""
    trainable_dtype = parse_dtype(cfg.trainable_dtype)
    trainable = select_trainable(model, cfg.preset, cfg.train, cfg.freeze, cfg.lora_targets, cfg.lora_rank,
                                 cfg.lora_alpha, cfg.lora_dropout, trainable_dtype)
    params = dict(model.named_parameters())
    for n in trainable:
        params[n].data = params[n].data.to(trainable_dtype)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    return trainable
