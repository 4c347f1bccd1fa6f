"""The language model: a Vicuna-7B (Llama-2) decoder whose every layer carries a visual expert (CogVLM paper, 2.1).

Pre-norm layers, `x + Attn(RMSNorm(x))` then `x + MLP(RMSNorm(x))`; rotary positions; no biases; an untied lm_head.
The attention and MLP of each layer live in `visual_expert.py`, because each token picks its own copy of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TextConfig
from .fusion import fused
from .visual_expert import ExpertRoute, VisualExpertAttention, VisualExpertMLP


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In fp32 whatever the model dtype, and cast back only after the weight multiply, as Llama's reference does:
    # casting before the multiply gives visibly different bf16 outputs.
    # The output takes the weight's dtype: the residual stream may be fp32 while the layers run in bf16.
    return (weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps)).to(weight.dtype)  # x * rsqrt(mean(x^2) + eps)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 rotary frequencies 1 / theta^(2j/head_dim) (the hub checkpoints store them as buffers)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) position ids -> cos, sin of shape (B, L, 1, 1, head_dim/2), fp32; angle = pos / theta^(2j/head_dim).

    The two singleton axes broadcast over (q|k, heads) of the projected (B, L, 2, H, head_dim) queries and keys."""
    angles = position_ids[:, :, None, None, None].float() * rope_inv_freq(head_dim, theta, position_ids.device)
    return angles.cos(), angles.sin()


def attention_mask(query_pos: torch.Tensor, key_valid: torch.Tensor | None, num_keys: int) -> torch.Tensor:
    """Boolean (B or 1, 1, L, S) mask, True = may attend: causal over cache slots, minus padded keys.

    query_pos: (L,) cache slot of each query; key_valid: (B, S) with 1 for real tokens, or None.
    A query always sees its own slot, so the rows of left-padding tokens (all of whose keys are pads) stay finite
    instead of becoming NaN; their values are garbage that no real token ever attends to.
    """
    key_idx = torch.arange(num_keys, device=query_pos.device)
    causal = key_idx[None, :] <= query_pos[:, None]  # (L, S)
    if key_valid is None:
        return causal[None, None]
    mask = causal[None] & key_valid[:, None, :num_keys].bool()
    return (mask | (key_idx[None, :] == query_pos[:, None])[None])[:, None]


class KVCache(nn.Module):
    """A preallocated (static) key/value cache for one layer: (B, H, S_max, hd) each."""

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, num_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, L, hd) keys/values at slots `pos`: a tensor of L slots (graph-safe: no host value), or an
        int, the first of L consecutive slots (a plain slice copy, much faster for a long prompt)."""
        if isinstance(pos, int):
            self.k[:, :, pos : pos + k.shape[2]].copy_(k)
            self.v[:, :, pos : pos + k.shape[2]].copy_(v)
        else:  # (an index_put_, which inductor keeps in place when a compiled layer writes the cache)
            self.k[:, :, pos] = k
            self.v[:, :, pos] = v
        return self.k, self.v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisualExpertAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = VisualExpertMLP(cfg)

    def forward(self, x, rope, expert_route, attn_mask=None, kv_cache=None, cache_pos=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, expert_route, attn_mask, kv_cache, cache_pos)
        return x + self.mlp(self.mlp_norm(x), expert_route)


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each layer in backward instead of storing its activations

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        expert_route: ExpertRoute | None = None,
        key_valid: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        cache_pos: torch.Tensor | int | None = None,
        trace: dict | None = None,
    ) -> torch.Tensor:
        """(B, L, D) input embeddings -> (B, L, D) final-norm output (apply `lm_head` for logits).

        Without kv_caches, attention is over x itself; key_valid (B, L) marks padding, None means no padding.
        With kv_caches, the new keys go to slots cache_pos ((L,) tensor, or int first slot) and key_valid (B, S_max) says which cache slots hold
        real tokens; key_valid=None then means "an unpadded prompt written to empty caches from slot 0".
        """
        rope = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = x.float()  # the residual stream stays in fp32; every sublayer runs in the weights' dtype (bf16 on GPUs)
        if key_valid is None:
            mask = None  # no padding and (with caches) a prefill into empty caches: causal attention over x
        elif kv_caches is None:
            mask = attention_mask(torch.arange(x.shape[1], device=x.device), key_valid, x.shape[1])
        else:
            query_slots = torch.arange(cache_pos, cache_pos + x.shape[1], device=x.device) if isinstance(
                cache_pos, int) else cache_pos
            mask = attention_mask(query_slots, key_valid, kv_caches[0].k.shape[2])
        for i, layer in enumerate(self.layers):
            cache = None if kv_caches is None else kv_caches[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, expert_route, mask, cache, cache_pos, use_reentrant=False)
            else:
                x = layer(x, rope, expert_route, mask, cache, cache_pos)
            if trace is not None:
                trace[f"decoder_layer{i}_out"] = x
        x = self.norm(x)
        if trace is not None:
            trace["final_norm_out"] = x
        return x
