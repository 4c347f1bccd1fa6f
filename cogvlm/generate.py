"""Cached decoding: prefill the prompt once, then one token per step against a preallocated (static) KV cache."""
from __future__ import annotations

import torch

from .model import CogVLM, build_position_ids


class DecodeSession:
    """The state of a batch being decoded: per-layer KV caches, which cache slots hold real tokens, next positions.

    Cache slot t holds the t-th token fed (left padding included). Rotary positions are CogVLM's own: the image
    spans 3 positions, so after the prompt each new token takes the row's previous largest position + 1, as the
    reference recomputes them from the token types at every step.
    """

    def __init__(self, model: CogVLM, batch_size: int, max_len: int):
        if max_len > model.cfg.text.max_position_embeddings:
            raise ValueError(
                f"{max_len} tokens (prompt + new tokens) exceed the model's max_position_embeddings "
                f"({model.cfg.text.max_position_embeddings}); shorten the prompt or lower max_new_tokens"
            )
        self.model = model
        self.caches = model.new_kv_caches(batch_size, max_len)
        device = self.caches[0].k.device
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # cache slots used so far
        self.next_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def prefill(self, input_ids, token_type_ids=None, attention_mask=None, pixel_values=None) -> torch.Tensor:
        """Run the prompt (B, L); returns the last position's logits (B, V)."""
        B, L = input_ids.shape
        device = self.key_valid.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = build_position_ids(token_type_ids, attention_mask)
        self.key_valid[:, :L] = attention_mask.bool()
        out = self.model(
            input_ids.to(device),
            token_type_ids.to(device),
            self.key_valid,
            pixel_values,
            position_ids.to(device),
            kv_caches=self.caches,
            cache_pos=torch.arange(L, device=device),
            last_logits_only=True,
        )
        self.length = L
        self.next_pos = position_ids.max(dim=1, keepdim=True).values.to(device) + 1
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the logits (B, V) for the next one. Every step is text."""
        if self.length >= self.key_valid.shape[1]:
            raise ValueError(f"the KV cache is full ({self.length} tokens); allocate a longer session")
        t = self.length
        self.key_valid[:, t] = True
        out = self.model(
            tokens[:, None].to(self.key_valid.device),
            attention_mask=self.key_valid,
            position_ids=self.next_pos,
            kv_caches=self.caches,
            cache_pos=torch.tensor([t], device=self.key_valid.device),
        )
        self.length += 1
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]

    @property
    def last_positions(self) -> torch.Tensor:
        """(B,) rotary position of the last token fed."""
        return self.next_pos[:, 0] - 1
