"""Cached decoding: prefill the prompt once, then one token per step against a preallocated (static) KV cache."""
from __future__ import annotations

import torch

from .model import CogVLM, build_position_ids


class DecodeSession:
    """The state of a batch being decoded: per-layer KV caches, which cache slots hold real tokens, next positions.

    Cache slot t holds the t-th token fed (left padding included). Rotary positions are CogVLM's own: the image
    spans 3 positions, so after the prompt each new token takes the row's previous largest position + 1, as the
    reference recomputes them from the token types at every step.

    All per-step state lives in device tensors updated in place, so a decode step has no host sync and can be
    captured once as a CUDA graph and replayed (`cuda_graph=True`, the default on GPUs): at batch 1 a step is
    hundreds of small kernels, and replaying them as one graph removes the launch overhead between them.
    """

    def __init__(self, model: CogVLM, batch_size: int, max_len: int, cuda_graph: bool | None = None):
        if max_len > model.cfg.text.max_position_embeddings:
            raise ValueError(
                f"{max_len} tokens (prompt + new tokens) exceed the model's max_position_embeddings "
                f"({model.cfg.text.max_position_embeddings}); shorten the prompt or lower max_new_tokens"
            )
        self.model = model
        self.caches = model.new_kv_caches(batch_size, max_len)
        device = self.caches[0].k.device
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # cache slots used so far (host-side copy of cache_pos, for bounds checks)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)  # slot of the next token
        self.next_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # its rotary position
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # its id (static input buffer)
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = None
        self.graph_logits = None

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
        padded = not bool(attention_mask.all())
        out = self.model(
            input_ids.to(device),
            token_type_ids.to(device),
            self.key_valid if padded else None,  # unpadded: plain causal attention over the prompt (flash)
            pixel_values,
            position_ids.to(device),
            kv_caches=self.caches,
            cache_pos=torch.arange(L, device=device),
            last_logits_only=True,
        )
        self.length = L
        self.cache_pos.fill_(L)
        self.next_pos.copy_(position_ids.max(dim=1, keepdim=True).values)
        self.next_pos += 1
        return out.logits[:, -1]

    def _step(self) -> torch.Tensor:
        """One decode step on the static buffers; only in-place device work, so it can be graph-captured."""
        self.key_valid.index_fill_(1, self.cache_pos, True)
        logits = self.model(
            self.tokens,
            attention_mask=self.key_valid,
            position_ids=self.next_pos,
            kv_caches=self.caches,
            cache_pos=self.cache_pos,
        ).logits[:, -1]
        self.cache_pos += 1
        self.next_pos += 1
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream (cuBLAS and allocator set-up must not happen during capture), then undo the
        # warm-up's state changes: the slot it wrote is written again by the first real step.
        saved = (self.key_valid.clone(), self.cache_pos.clone(), self.next_pos.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        for buf, old in zip((self.key_valid, self.cache_pos, self.next_pos), saved):
            buf.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self._step()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the logits (B, V) for the next one. Every step is text.

        With a CUDA graph the returned tensor is a static buffer, overwritten by the next step."""
        if self.length >= self.key_valid.shape[1]:
            raise ValueError(f"the KV cache is full ({self.length} tokens); allocate a longer session")
        self.tokens.copy_(tokens.view(-1, 1))
        self.length += 1
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.graph_logits

    @property
    def last_positions(self) -> torch.Tensor:
        """(B,) rotary position of the last token fed."""
        return self.next_pos[:, 0] - 1
