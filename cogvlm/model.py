"""CogVLM assembled: ViT -> adapter -> image embeddings spliced into the token sequence -> decoder -> logits.

Inputs follow the reference's `build_conversation_input_ids`: `[bos, boi, patch_1 .. patch_N, eoi, text ...]`,
where the N+2 image positions carry token type 1 and a placeholder id, and their embeddings are replaced by the
adapter's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter
from .config import CogVLMConfig
from .llm import KVCache, LanguageModel
from .layout import IGNORE_INDEX, VISION_TOKEN_TYPE, build_position_ids
from .visual_expert import ExpertRoute
from .vit import VisionTransformer

@dataclass
class Output:
    logits: torch.Tensor | None  # (B, L, V) fp32; (B, 1, V) with last_logits_only; None with return_logits=False
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labelled positions


class CogVLM(nn.Module):
    def __init__(self, cfg: CogVLMConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        # The compute dtype, owned here rather than read from a weight (a quantized linear stores integers): the ViT
        # and adapter sublayers and the KV caches use it; the decoder's sublayers follow their RMSNorm weights.
        self.dtype = dtype or torch.get_default_dtype()
        self.vision = VisionTransformer(cfg.vision)
        self.adapter = Adapter(cfg)
        self.llm = LanguageModel(cfg.text)

    def encode_images(self, pixel_values: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, N+2, D) embeddings, boi and eoi included."""
        return self.adapter(self.vision(pixel_values, self.dtype, trace), self.dtype, trace)

    def embed(self, input_ids, token_type_ids=None, pixel_values=None, trace=None) -> torch.Tensor:
        """Token embeddings with the image positions overwritten by the image features, row-major over the batch."""
        x = self.llm.embed(input_ids)
        if token_type_ids is not None and pixel_values is not None:
            image_pos = (token_type_ids == VISION_TOKEN_TYPE).to(x.device)
            n_pos, n_img = int(image_pos.sum()), pixel_values.shape[0]  # (checked before the ViT is queued: the
            if n_pos != n_img * self.cfg.num_image_tokens:              # host then waits on nothing behind it)
                raise ValueError(
                    f"token_type_ids mark {n_pos} image positions, but {n_img} image(s) give "
                    f"{self.cfg.num_image_tokens} embeddings each; each image needs exactly "
                    f"{self.cfg.num_image_tokens} positions of token type {VISION_TOKEN_TYPE}"
                )
            features = self.encode_images(pixel_values, trace).to(device=x.device, dtype=x.dtype)
            x = x.masked_scatter(image_pos[..., None], features)
        elif token_type_ids is not None and bool((token_type_ids == VISION_TOKEN_TYPE).any()):
            raise ValueError("token_type_ids mark image positions but no pixel_values were given")
        if trace is not None:
            trace["inputs_embeds"] = x
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        cache_pos: torch.Tensor | int | None = None,
        last_logits_only: bool = False,
        return_logits: bool = True,
        trace: dict | None = None,
    ) -> Output:
        """One pass over a batch of token sequences.

        input_ids, token_type_ids, attention_mask, labels: (B, L); pixel_values: (n_images, 3, S, S) for the rows
        that hold an image, in row order. token_type_ids=None means all text. attention_mask=None means no padding;
        with kv_caches it covers the whole cache, (B, S_max). position_ids default to `build_position_ids`.
        `return_logits=False` skips the logits (training: the loss needs only the labelled positions).
        `trace`, if a dict, receives every intermediate result under the names of the reference fixtures
        (vit_patch_embed_out, vit_layer{i}_out, adapter_glu_out, adapter_out_with_boi_eoi, inputs_embeds,
        decoder_layer{i}_out, final_norm_out).
        """
        if position_ids is None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            mask = attention_mask if kv_caches is None else None
            position_ids = build_position_ids(types, mask)
        # The route first: it reads the token types back to the host, which must not wait behind the queued ViT.
        route = None if token_type_ids is None else ExpertRoute.from_token_types(token_type_ids)
        x = self.embed(input_ids, token_type_ids, pixel_values, trace)
        key_valid = attention_mask
        if kv_caches is None and attention_mask is not None and bool(attention_mask.all()):
            key_valid = None  # no padding: plain causal attention (the flash path)
        h = self.llm(x, position_ids, route, key_valid, kv_caches, cache_pos, trace)
        loss = None
        if labels is not None:
            # Position t predicts token t+1, so shift by one; a mean over the labelled positions, as the reference.
            # Only those positions go through lm_head: the (L x vocab) logits of image and prompt are never needed.
            target = labels[:, 1:].to(h.device)
            labelled = target != IGNORE_INDEX
            loss = F.cross_entropy(self.llm.lm_head(h[:, :-1][labelled]).float(), target[labelled])
        if not return_logits:
            return Output(logits=None, loss=loss)
        if last_logits_only:
            h = h[:, -1:]
        return Output(logits=self.llm.lm_head(h).float(), loss=loss)

    def set_dtype(self, dtype: torch.dtype) -> "CogVLM":
        """Cast the floating-point weights to `dtype` and compute in it (integer tensors, e.g. quantized weights, stay
        as they are). Use this rather than `model.to(dtype)`, which would leave the compute dtype behind."""
        self.to(dtype)
        self.dtype = dtype
        return self

    def new_kv_caches(self, batch_size: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        """One static cache per decoder layer, shaped by that layer's attention (its heads, its head size: a
        tensor-parallel attention holds fewer heads), on that layer's device unless `device` is given."""
        caches = []
        for layer in self.llm.layers:
            attn = layer.attn
            caches.append(KVCache(batch_size, attn.num_heads, max_len, attn.head_dim, dtype or self.dtype,
                                  device or layer.attn_norm.weight.device))
        return caches
