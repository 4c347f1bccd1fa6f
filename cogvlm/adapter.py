"""The MLP adapter (CogVLM paper, section 2.1): ViT patch features -> language-model embeddings.

It is a "GLU" in the reference's naming: a linear projection to the LM width, LayerNorm and GELU, then a SwiGLU MLP
as wide as the LM's own MLP. The image is framed by two learned vectors, boi and eoi, so the decoder sees
`[boi, patch_1 .. patch_N, eoi]` in the image's place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CogVLMConfig
from .visual_expert import silu_gate


class Adapter(nn.Module):
    def __init__(self, cfg: CogVLMConfig):
        super().__init__()
        d_vit, d, d_ff = cfg.vision.hidden_size, cfg.text.hidden_size, cfg.text.intermediate_size
        self.proj = nn.Linear(d_vit, d, bias=False)
        self.norm = nn.LayerNorm(d)  # default eps 1e-5, as the reference
        self.gate_up = nn.Linear(d, 2 * d_ff, bias=False)  # [gate | up] fused at conversion
        self.down = nn.Linear(d_ff, d, bias=False)
        self.boi = nn.Parameter(torch.empty(1, 1, d))  # begin-of-image vector
        self.eoi = nn.Parameter(torch.empty(1, 1, d))  # end-of-image vector

    def glu(self, patches: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, N, D_vit) patch features (cls already dropped) -> (B, N, D), computed in `dtype`."""
        x = F.gelu(self.norm(self.proj(patches.to(dtype))))
        return self.down(silu_gate(self.gate_up(x)))

    def forward(self, vit_out: torch.Tensor, dtype: torch.dtype, trace: dict | None = None) -> torch.Tensor:
        """(B, 1+N, D_vit) ViT output, cls first -> (B, N+2, D) image embeddings with boi and eoi."""
        x = self.glu(vit_out[:, 1:], dtype)  # the cls token is not used by CogVLM
        B = x.shape[0]
        out = torch.cat([self.boi.expand(B, -1, -1), x, self.eoi.expand(B, -1, -1)], dim=1)
        if trace is not None:
            trace["adapter_glu_out"] = x
            trace["adapter_out_with_boi_eoi"] = out
        return out
