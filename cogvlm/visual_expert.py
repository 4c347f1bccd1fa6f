"""The visual expert (CogVLM paper, section 2.1, "Visual expert module").

Every decoder layer holds two copies of its attention projections (QKV and output dense) and of its SwiGLU MLP:
one for text tokens (the frozen Vicuna weights) and one for image tokens (the "visual expert", trained). Each token
goes through exactly one copy; attention itself runs over all tokens together, so text attends to image features
computed by the image copy and vice versa.

Which copy a token uses follows the reference's mask: a position is *vision* when it and the next position both
have token type 1. So boi and the patches take the vision expert and **eoi, the last image position, takes the
language expert**; the last position of a sequence is always language, and so is every cached decode step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .fusion import fused
from .layout import VISION_TOKEN_TYPE


@dataclass
class ExpertRoute:
    """Which tokens each expert processes, computed once per forward pass: flat indices into batch*length, and, when
    every row has its vision tokens at the same positions [start, end) (one image in a single prompt, a caption batch
    of one prompt), that span, which lets `route` slice instead of gather."""

    vision: torch.Tensor  # (Nv,) long
    language: torch.Tensor  # (Nl,) long
    inverse: torch.Tensor  # (Nv+Nl,) where each token sits in cat(vision tokens, language tokens)
    span: tuple[int, int] | None = None  # (start, end) of the vision positions, the same in every row

    @classmethod
    def from_token_types(cls, token_type_ids: torch.Tensor) -> "ExpertRoute | None":
        """None when every token is text: the caller then runs the language expert on everything, no gathering."""
        mask = vision_expert_mask(token_type_ids.cpu())  # (one read to the host, as the indices need anyway)
        if not mask.any():
            return None
        flat = mask.flatten()
        vision, language = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        device = token_type_ids.device
        return cls(vision=vision.to(device), language=language.to(device),
                   inverse=torch.cat([vision, language]).argsort().to(device), span=shared_span(mask))


def shared_span(mask: torch.Tensor) -> tuple[int, int] | None:
    """(start, end) if every row of the (B, L) mask is True on exactly positions start..end-1, else None."""
    positions = mask[0].nonzero().squeeze(1)
    if len(positions) == 0 or not torch.equal(mask, mask[:1].expand_as(mask)):
        return None
    start, end = int(positions[0]), int(positions[-1]) + 1
    return (start, end) if end - start == len(positions) else None


def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where the vision expert runs. eoi goes through the language expert, as the reference's
    mask does, because it is the last of a run of image positions."""
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return mask


def route(x: torch.Tensor, expert_route: ExpertRoute | None, vision_fn, language_fn) -> torch.Tensor:
    """Apply vision_fn to the vision tokens and language_fn to the others; (B, L, D_in) -> (B, L, D_out).

    Each expert sees only its own tokens (no masked copies of full tensors). With a shared span the vision tokens
    are a slice (no copy for one row) and the output is put together with one concatenation; otherwise they are
    gathered by index.
    """
    if expert_route is None:
        return language_fn(x)
    if expert_route.span is not None:
        start, end = expert_route.span
        out_v = vision_fn(x[:, start:end])
        out_l = language_fn(torch.cat([x[:, :start], x[:, end:]], dim=1))
        return torch.cat([out_l[:, :start], out_v, out_l[:, start:]], dim=1)
    B, L, _ = x.shape
    flat = x.reshape(B * L, -1)
    vision_idx, language_idx = expert_route.vision, expert_route.language
    out_v = vision_fn(flat.index_select(0, vision_idx))
    out_l = language_fn(flat.index_select(0, language_idx))
    # Back to token order with one gather (GPU gathers are much faster than the equivalent two scatters).
    return torch.cat([out_v, out_l]).index_select(0, expert_route.inverse).view(B, L, -1)


@fused
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, NeoX layout: the two halves of each head are the rotated pairs (not interleaved).

    x: (B, L, ..., hd); cos, sin: (B, L, 1, 1, hd/2) in fp32. Computed in fp32 and cast back, so bf16 runs keep
    the positional phase exact (the reference rounds it to bf16, which costs accuracy at long positions).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class VisualExpertAttention(nn.Module):
    """Causal self-attention whose QKV and output projections are chosen per token by `route`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        # QKV output is laid out [q | k | v], each (heads, head_dim); no biases in CogVLM-17B's decoder.
        self.vision_expert_qkv = nn.Linear(d, 3 * d, bias=False)
        self.language_expert_qkv = nn.Linear(d, 3 * d, bias=False)
        self.vision_expert_dense = nn.Linear(d, d, bias=False)
        self.language_expert_dense = nn.Linear(d, d, bias=False)

    def forward(self, x, rope, expert_route, attn_mask=None, kv_cache=None, cache_pos=None) -> torch.Tensor:
        """x: (B, L, D); rope: (cos, sin); attn_mask: (B, 1, L, S) bool over the cache (or over x without one), or
        None for plain causal attention over x itself (the flash-attention path); kv_cache/cache_pos: write this
        step's keys and values at slots cache_pos (a tensor, or an int: the first of L consecutive slots), and attend
        over the whole cache when a mask is given."""
        B, L, _ = x.shape
        qkv = route(x, expert_route, self.vision_expert_qkv, self.language_expert_qkv)
        qkv = qkv.view(B, L, 3, self.num_heads, -1)
        q, k = apply_rotary(qkv[:, :, :2], *rope).permute(2, 0, 3, 1, 4)  # q and k in one pass; 2 x (B, H, L, hd)
        v = qkv[:, :, 2].transpose(1, 2)
        if kv_cache is not None:
            cached_k, cached_v = kv_cache.update(cache_pos, k, v)  # (B, H, S_max, hd)
            if attn_mask is not None:  # otherwise: an unpadded prefill into an empty cache, causal over x itself
                k, v = cached_k, cached_v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        out = out.transpose(1, 2).reshape(B, L, -1)
        return route(out, expert_route, self.vision_expert_dense, self.language_expert_dense)


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), with gate and up fused into one matrix at conversion."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * d_ff, bias=False)  # [gate | up]
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_gate(self.gate_up(x)))


@fused
def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate | up] -> silu(gate) * up, the SwiGLU nonlinearity."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class VisualExpertMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.vision_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.language_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, expert_route: ExpertRoute | None) -> torch.Tensor:
        return route(x, expert_route, self.vision_expert, self.language_expert)
