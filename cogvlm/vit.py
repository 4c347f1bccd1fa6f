"""The vision tower: EVA2-CLIP-E, a plain ViT (CogVLM paper, section 2.1, "ViT encoder").

Two details differ from a textbook pre-norm ViT, and both come from EVA2-CLIP as CogVLM ships it:
- there is no LayerNorm before the blocks or after the last one;
- each block normalises the *output* of its sublayer before adding it to the residual stream:
  `x = x + LN1(Attn(x)); x = x + LN2(MLP(x))` ("post-sublayer" LayerNorm).
The cls token is computed with the patches but dropped before the adapter (see `adapter.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig


class PatchEmbedding(nn.Module):
    """Image -> patch tokens: a strided conv, a learned cls token in front, learned absolute positions added."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_positions, cfg.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+N, D)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused, biased QKV projection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # output laid out as [q | k | v], heads inside
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hd), no mask: every patch sees every patch
        return self.proj(out.transpose(1, 2).reshape(B, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as EVA2-CLIP


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn = VisionAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # applied to the attention OUTPUT
        self.mlp = VisionMLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # applied to the MLP OUTPUT

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The residual stream x stays in fp32 (see VisionTransformer); each sublayer runs in the compute dtype.
        x = x + self.attn_norm(self.attn(x.to(dtype))).float()
        return x + self.mlp_norm(self.mlp(x.to(dtype))).float()


class VisionTransformer(nn.Module):
    """EVA2-CLIP-E: (B, 3, S, S) pixels -> (B, 1 + N, D_vit) fp32 features, cls first. The sublayers run in `dtype`,
    the model's compute dtype (bf16 on GPUs), whatever the weights are stored as (a quantized linear holds integers)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbedding(cfg)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # recompute each block in backward instead of storing its activations

    def forward(self, images: torch.Tensor, dtype: torch.dtype, trace: dict | None = None) -> torch.Tensor:
        # The residual stream is kept in fp32 whatever the weights' dtype: with post-sublayer LayerNorm it grows layer
        # after layer, and rounding it to bf16 at every addition was the largest source of bf16-vs-fp32 error
        # (measured: 40 % less error at the ViT output for a few hundred KB of extra activations).
        x = self.patch_embed(images.to(dtype)).float()
        if trace is not None:
            trace["vit_patch_embed_out"] = x
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, dtype, use_reentrant=False)
            else:
                x = layer(x, dtype)
            if trace is not None:
                trace[f"vit_layer{i}_out"] = x
        if trace is not None:
            trace["vit_final_out"] = x  # no final LayerNorm in EVA2-CLIP as CogVLM uses it
        return x
