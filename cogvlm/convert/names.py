"""The one table from the hub's parameter names (`THUDM/cogvlm-*-hf`) to ours, in both directions.

Each entry names one of our tensors and the hub tensors it is made of. One hub tensor maps to one of ours unchanged;
two hub tensors (an MLP's gate_proj and up_proj) are concatenated along dim 0 into one fused matrix, and split
back in the same order on export. Shapes are otherwise identical, so conversion never changes a value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CogVLMConfig


@dataclass(frozen=True)
class Entry:
    ours: str
    hub: tuple[str, ...]  # concatenated along dim 0, in this order


# Hub buffers that hold no learned weights: the reference stores each layer's rotary inverse frequencies.
# We recompute them from the config, so conversion accepts and drops them.
DROPPED_SUFFIXES = (".self_attn.rotary_emb.inv_freq",)

_VISION_LAYER = [
    ("attn.qkv.weight", "attention.query_key_value.weight"),
    ("attn.qkv.bias", "attention.query_key_value.bias"),
    ("attn.proj.weight", "attention.dense.weight"),
    ("attn.proj.bias", "attention.dense.bias"),
    ("attn_norm.weight", "input_layernorm.weight"),  # EVA2-CLIP's "input" LN is applied to the attention output
    ("attn_norm.bias", "input_layernorm.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
    ("mlp_norm.bias", "post_attention_layernorm.bias"),
]

_DECODER_LAYER = [
    ("attn_norm.weight", ("input_layernorm.weight",)),
    ("mlp_norm.weight", ("post_attention_layernorm.weight",)),
    ("attn.vision_expert_qkv.weight", ("self_attn.vision_expert_query_key_value.weight",)),
    ("attn.language_expert_qkv.weight", ("self_attn.language_expert_query_key_value.weight",)),
    ("attn.vision_expert_dense.weight", ("self_attn.vision_expert_dense.weight",)),
    ("attn.language_expert_dense.weight", ("self_attn.language_expert_dense.weight",)),
    ("mlp.vision_expert.gate_up.weight", ("mlp.vision_mlp.gate_proj.weight", "mlp.vision_mlp.up_proj.weight")),
    ("mlp.vision_expert.down.weight", ("mlp.vision_mlp.down_proj.weight",)),
    ("mlp.language_expert.gate_up.weight", ("mlp.language_mlp.gate_proj.weight", "mlp.language_mlp.up_proj.weight")),
    ("mlp.language_expert.down.weight", ("mlp.language_mlp.down_proj.weight",)),
]


def name_table(cfg: CogVLMConfig) -> list[Entry]:
    """Every tensor of a CogVLM with this config, in checkpoint order (vision, adapter, decoder)."""
    v = "model.vision."
    table = [
        Entry("vision.patch_embed.proj.weight", (v + "patch_embedding.proj.weight",)),
        Entry("vision.patch_embed.proj.bias", (v + "patch_embedding.proj.bias",)),
        Entry("vision.patch_embed.cls_token", (v + "patch_embedding.cls_embedding",)),
        Entry("vision.patch_embed.pos_embed", (v + "patch_embedding.position_embedding.weight",)),
    ]
    for i in range(cfg.vision.num_hidden_layers):
        table += [Entry(f"vision.layers.{i}.{o}", (f"{v}transformer.layers.{i}.{h}",)) for o, h in _VISION_LAYER]
    table += [
        Entry("adapter.proj.weight", (v + "linear_proj.linear_proj.weight",)),
        Entry("adapter.norm.weight", (v + "linear_proj.norm1.weight",)),
        Entry("adapter.norm.bias", (v + "linear_proj.norm1.bias",)),
        # the reference computes silu(gate_proj(x)) * dense_h_to_4h(x): dense_h_to_4h is the "up" half
        Entry("adapter.gate_up.weight", (v + "linear_proj.gate_proj.weight", v + "linear_proj.dense_h_to_4h.weight")),
        Entry("adapter.down.weight", (v + "linear_proj.dense_4h_to_h.weight",)),
        Entry("adapter.boi", (v + "boi",)),
        Entry("adapter.eoi", (v + "eoi",)),
        Entry("llm.embed.weight", ("model.embed_tokens.weight",)),
    ]
    for i in range(cfg.text.num_hidden_layers):
        table += [Entry(f"llm.layers.{i}.{o}", tuple(f"model.layers.{i}.{h}" for h in hs)) for o, hs in _DECODER_LAYER]
    table += [Entry("llm.norm.weight", ("model.norm.weight",)), Entry("llm.lm_head.weight", ("lm_head.weight",))]
    return table


def to_hub(entry: Entry, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our tensor (a weight, or its gradient) under the hub name(s) it came from, fused matrices split back."""
    return dict(zip(entry.hub, tensor.chunk(len(entry.hub))))


def is_dropped(hub_name: str) -> bool:
    return hub_name.endswith(DROPPED_SUFFIXES)


def hub_buffers(cfg: CogVLMConfig) -> dict[str, tuple[int, ...]]:
    """The non-learned buffers the hub layout carries, re-created on export so the hub code loads cleanly."""
    return {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (cfg.text.head_dim // 2,)
        for i in range(cfg.text.num_hidden_layers)
    }
