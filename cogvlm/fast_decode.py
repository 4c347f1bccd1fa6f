"""The decode step with the kernels of `cogvlm.decode_kernels`: at batch 1, seven kernels per decoder layer.

`DecodeSession` records this step into its CUDA graph instead of `model(...)` when `FastStep.build` accepts the
model. It computes what `CogVLM.forward` computes for one text token per row against the KV cache (every decode
token takes the language expert), reading the same modules' weights:

    qkv = [RMSNorm + QKV product]            q = rotary(q); k, v = rotary(k), v -> cache slot   (rope_kv)
    a   = attention over the cache (split)   x = x + [dense product]
    h   = [RMSNorm + gate|up product + SiLU gate]                 x = x + [down product]
    logits = [final RMSNorm + lm_head product]

An int4 layer of groups of whole tiles (128 or 256 inputs) runs its products in `cogvlm.decode_int4`'s kernel, with
the same options (`COGVLM_DECODE_INT4=0`: through its module instead). Where a projection is not a plain
`nn.Linear`, an int8 layer or such an int4 layer (smaller int4 groups, LoRA wrappers, anything swapped in), that
projection runs through its own module, its residual add left pending for the next norm's kernel (`add_norm`: add and
RMSNorm in one) and its SwiGLU gate in one kernel, and the rest keeps the kernels. At batches 2..MAX_BATCH the
products are cuBLAS's (through the modules) and rotary, the cache writes and attention keep the kernels. A model
whose layers are not the stock modules, or that carries hooks, keeps the ordinary step. `COGVLM_DECODE_KERNELS=0`
turns this off.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .llm import DecoderLayer, RMSNorm, rope_tables
from .visual_expert import SwiGLU, VisualExpertAttention, VisualExpertMLP

FAST_INT4 = os.environ.get("COGVLM_DECODE_INT4", "1") != "0"  # int4 layers' one-row product in the step's kernel
MAX_BATCH = 16  # at 8 rows as fast as the compiled layers (H200); beyond, not compared (they read 86 % at 32)
STOCK = {"layer": DecoderLayer, "attn": VisualExpertAttention, "mlp": VisualExpertMLP, "attn_norm": RMSNorm,
         "mlp_norm": RMSNorm, "mlp.language_expert": SwiGLU}


class FastStep:
    """The decode step of a session: `step(tokens, key_valid, next_pos, cache_pos) -> (B, V)` logits."""

    def __init__(self, model, caches, kernels):
        self.model, self.caches, self.k = model, caches, kernels
        self.dtype = model.dtype

    @classmethod
    def build(cls, model, batch_size: int, caches) -> "FastStep | None":
        """The fast step for this model and session, or None where it does not apply (see the module's doc)."""
        from .quantize import triton_mm

        if os.environ.get("COGVLM_DECODE_KERNELS", "1") == "0" or batch_size > MAX_BATCH or not triton_mm.enabled():
            return None
        device = caches[0].k.device
        if not (device.type == "cuda" or triton_mm.INTERPRETED) or model.dtype not in (
                torch.bfloat16, torch.float16, torch.float32):
            return None
        # (module, the type it must have or None): each layer's parts, and the final norm and lm_head, which the
        # last kernel reads; a hook on any of them would be skipped
        parts = [(layer.get_submodule(name) if name != "layer" else layer, kind)
                 for layer in model.llm.layers for name, kind in STOCK.items()]
        parts += [(model.llm.norm, RMSNorm), (model.llm.lm_head, None)]
        if any((kind is not None and type(m) is not kind) or m._forward_hooks or m._forward_pre_hooks
               for m, kind in parts):
            return None
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        if any(p.device != device for p in model.llm.parameters()):
            return None
        from . import decode_kernels

        return cls(model, caches, decode_kernels)

    def step(self, tokens, key_valid, next_pos, cache_pos) -> torch.Tensor:
        llm, k = self.model.llm, self.k
        cfg = llm.cfg
        B = tokens.shape[0]
        # The residual stream in fp32, as LanguageModel.forward, with the product not yet added to it (None, or the
        # output of a projection that ran through its module: the next norm adds it in the same kernel).
        stream = (llm.embed(tokens).view(B, -1).float(), None)
        cos, sin = (t.view(B, -1) for t in rope_tables(next_pos, cfg.head_dim, cfg.rope_theta))
        for layer, cache in zip(llm.layers, self.caches):
            attn, mlp = layer.attn, layer.mlp.language_expert
            x, qkv = self.normed(stream, attn.language_expert_qkv, layer.attn_norm)
            q = k.rope_kv(qkv, cos, sin, cache.k, cache.v, cache_pos)
            a = k.attend(q, cache.k, cache.v, key_valid, cache_pos)
            stream = self.added(x, attn.language_expert_dense, a.view(B, -1))
            x, h = self.normed(stream, mlp.gate_up, layer.mlp_norm, gate=True)
            stream = self.added(x, mlp.down, h)
        _, logits = self.normed(stream, llm.lm_head, llm.norm)  # the final norm in lm_head's product, as a layer's
        return logits.float()

    def normed(self, stream, linear: nn.Module, norm: RMSNorm, gate: bool = False):
        """(x: the stream with its pending product added, linear(norm(x))), gated by SwiGLU with gate: in one kernel
        for one row when the kernels read this layer's weight, else the add and the norm in one kernel, then the
        module."""
        x, pending = stream
        gemv, weight, scales = self.weights(linear, gate) if x.shape[0] == 1 else (None, None, None)
        if gemv is not None:
            x = x if pending is None else x + pending
            y = gemv(x.view(-1), weight, scales, norm=(norm.weight, norm.eps), gate=gate, out_dtype=self.dtype)
            return x, y.view(1, -1)
        x, h = self.k.add_norm(x, pending, norm.weight, norm.eps)
        y = linear(h[:, None]).squeeze(1)
        return x, self.k.silu_gate(y) if gate else y

    def added(self, x, linear: nn.Module, h: torch.Tensor):
        """The stream x plus linear(h): added in the product's kernel for one row when the kernels read this layer's
        weight, else left pending for the next norm."""
        gemv, weight, scales = self.weights(linear) if x.shape[0] == 1 else (None, None, None)
        if gemv is not None:
            y = gemv(h.reshape(-1), weight, scales, residual=x.view(-1), out_dtype=self.dtype)
            return y.view(1, -1), None
        return x, linear(h.to(self.dtype)[:, None]).squeeze(1)

    def weights(self, linear: nn.Module, gate: bool = False):
        """(product, weight, scales) of a layer the kernels read: a plain linear layer's weight in the model's dtype
        (scales None) or an int8 layer's codes and scales (`decode_kernels.gemv`), an int4 layer's words in
        tinygemm's layout and its scales and zeros (`decode_int4.gemv4`); (None, None, None) for anything else."""
        from .quantize.linear import Int4Linear, Int8Linear

        if type(linear) is nn.Linear and linear.bias is None and linear.weight.dtype == self.dtype:
            return self.k.gemv, linear.weight, None
        if type(linear) is Int8Linear and linear.bias is None and linear.weight.dtype == torch.int8:
            return self.k.gemv, linear.weight, linear.scales
        if (type(linear) is Int4Linear and linear.bias is None and linear.rows_kernel and FAST_INT4
                and linear.scale_zeros.dtype == self.dtype):
            from . import decode_int4

            if decode_int4.supported(linear.packed, linear.scale_zeros, linear.in_features, gate):
                return decode_int4.gemv4, linear.packed, linear.scale_zeros
        return None, None, None
