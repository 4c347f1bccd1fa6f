"""The meaning of a CogVLM token sequence, in one place: token types, the loss label of unsupervised positions, the
rotary position ids the reference derives from the token types, and how many positions one image takes.

The reference's `build_conversation_input_ids` lays a conversation out as `[bos, boi, patch_1 .. patch_N, eoi,
text ...]`: the N+2 image positions carry token type 1 (their embeddings are replaced by the adapter's output),
everything else token type 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LANGUAGE_TOKEN_TYPE = 0  # token_type_ids value of text (and padding) positions
VISION_TOKEN_TYPE = 1  # token_type_ids value of the image positions (boi, patches, eoi)
IGNORE_INDEX = -100  # label of positions that carry no loss (bos, image, prompt, padding)


def image_token_count(image_size: int, patch_size: int) -> int:
    """Positions one image occupies: a (image_size // patch_size)^2 patch grid plus boi and eoi."""
    return (image_size // patch_size) ** 2 + 2


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) token types -> (B, L) rotary position ids, as the reference's latest hub revision computes them.

    The whole image spans three positions: boi and eoi count as text, and the N patches share a single position
    (the first patch advances it, the others do not). Pads (mask 0) never advance it. Position 0 is always 0, so
    after left padding the first real token (bos) sits at position 1; rotary is relative, so this changes nothing.
    """
    types = token_type_ids.clone()
    if attention_mask is not None:
        types[attention_mask == 0] = -1
    is_image = types == VISION_TOKEN_TYPE
    prev_is_text = F.pad(types[:, :-1] == LANGUAGE_TOKEN_TYPE, (1, 0), value=True)
    next_is_text = F.pad(types[:, 1:] == LANGUAGE_TOKEN_TYPE, (0, 1), value=True)
    types[is_image & (prev_is_text | next_is_text)] = LANGUAGE_TOKEN_TYPE  # boi and eoi count as text
    first_patch = (types == VISION_TOKEN_TYPE) & F.pad(types[:, :-1] == LANGUAGE_TOKEN_TYPE, (1, 0), value=False)
    advances = (types == LANGUAGE_TOKEN_TYPE) | first_patch
    advances[:, 0] = False
    return advances.long().cumsum(dim=1)
