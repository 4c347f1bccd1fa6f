"""Where the model looked: the decoder's attention from the answer to the image patches, as a heatmap.

The decoder's fast path (`F.scaled_dot_product_attention`) never forms the attention weights, so `plain_attention`
swaps every `VisualExpertAttention` for `PlainAttention` (from outside, with `cogvlm.swap.replace_modules`; the
model files are untouched), which computes softmax(QK^T / sqrt(d)) explicitly, uses it for its output as usual
and keeps the rows that `explain` asks for; the original modules are put back afterwards.

`explain(model, image, query)` answers (on the fast path, unless `answer` is given), runs one forward over prompt
+ answer through the plain path, and averages, over heads and over the positions that predict the answer's tokens
(and its end), the attention given to each of the N image patches: a (grid, grid) map per layer, each normalised
to sum 1, and their mean over the chosen layers. `heatmap(image, grid)` blends it onto the original image (the
model saw the image resized to a square, so the grid stretches over the original width and height).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from .layout import VISION_TOKEN_TYPE
from .swap import replace_modules, set_submodule
from .visual_expert import VisualExpertAttention, apply_rotary, route


class PlainAttention(VisualExpertAttention):
    """VisualExpertAttention computed as softmax(QK^T / sqrt(d)) V, with the weights of rows `keep_rows` to keys
    `keep_keys` kept (mean over heads) in `kept`: (B, len(keep_rows), len(keep_keys)), fp32. Shares the wrapped
    module's projections (the same weights, nothing copied). Only full forwards: no KV cache."""

    def __init__(self, attn: VisualExpertAttention):
        nn.Module.__init__(self)  # not VisualExpertAttention.__init__: the projections are the original ones
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        for name in ("vision_expert_qkv", "language_expert_qkv", "vision_expert_dense", "language_expert_dense"):
            setattr(self, name, getattr(attn, name))
        self.keep_rows: torch.Tensor | None = None
        self.keep_keys: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None

    def forward(self, x, rope, expert_route, attn_mask=None, kv_cache=None, cache_pos=None) -> torch.Tensor:
        if kv_cache is not None:
            raise ValueError("PlainAttention computes full forwards only (no KV cache)")
        B, L, _ = x.shape
        qkv = route(x, expert_route, self.vision_expert_qkv, self.language_expert_qkv)
        qkv = qkv.view(B, L, 3, self.num_heads, -1)
        q, k = apply_rotary(qkv[:, :, :2], *rope).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, hd)
        v = qkv[:, :, 2].transpose(1, 2)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        if attn_mask is None:  # plain causal attention, as the fast path's is_causal
            attn_mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
        if self.keep_rows is not None:
            self.kept = weights.mean(1)[:, self.keep_rows][:, :, self.keep_keys]
        out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(B, L, -1)
        return route(out, expert_route, self.vision_expert_dense, self.language_expert_dense)


@contextmanager
def plain_attention(model):
    """Inside the block, every decoder attention of `model` is a PlainAttention (yielded as a list, layer order);
    the original modules are back afterwards, also after an error."""
    originals = {}

    def make(name, attn):
        originals[name] = attn
        return PlainAttention(attn)

    names = replace_modules(model, ["llm.layers.*.attn"], make, kind=VisualExpertAttention, what="attention")
    try:
        yield [model.get_submodule(n) for n in names]
    finally:
        for name, attn in originals.items():
            set_submodule(model, name, attn)


@dataclass
class Explanation:
    answer: str
    layers: list[int]  # the decoder layers averaged into `grid`
    per_layer: torch.Tensor  # (num_layers, g, g): each layer's attention to the patches, each summing to 1
    grid: torch.Tensor  # (g, g): the mean of per_layer[layers], summing to 1; row-major like the image
    image_share: torch.Tensor  # (num_layers,): the fraction of the answer's attention that went to the patches

    def peak(self) -> tuple[int, int]:
        """(row, column) of the grid's largest value."""
        i = int(self.grid.argmax())
        return divmod(i, self.grid.shape[1])


def explain(model, image, query: str, answer: str | None = None, layers=None, template: str | None = None,
            **generation) -> Explanation:
    """The attention map of `model` answering `query` about `image` (path, bytes, file object or PIL image).

    answer: explain this answer instead of generating one (`generation` goes to `model.chat`); layers: decoder
    layer indices to average (default all; negative counts from the end).
    """
    from .chat import tokenizer_of
    from .image import load_image, preprocess
    from .prompt import build_inputs

    im = load_image(image)
    template = template or model.cfg.template_version
    if answer is None:
        answer = model.chat(im, query, template=template, **generation)
    n_layers = model.cfg.text.num_hidden_layers
    chosen = list(range(n_layers)) if layers is None else sorted({i % n_layers for i in _check_layers(layers, n_layers)})
    inputs = build_inputs(tokenizer_of(model), query, None, template, model.cfg.num_image_tokens, answer=answer,
                          max_length=model.cfg.text.max_position_embeddings)
    image_pos = torch.nonzero(inputs["token_type_ids"] == VISION_TOKEN_TYPE).flatten()
    patches = image_pos[1:-1]  # boi and eoi are not patches
    labelled = torch.nonzero(inputs["labels"] != -100).flatten()
    rows = labelled - 1  # the positions that predict the answer's tokens and its eos
    device = next(model.parameters()).device
    pixels = preprocess(im, model.cfg.vision.image_size)[None].to(device)
    with torch.no_grad(), plain_attention(model) as attns:
        for attn in attns:
            attn.keep_rows, attn.keep_keys = rows.to(device), patches.to(device)
        model(inputs["input_ids"][None].to(device), inputs["token_type_ids"][None].to(device),
              pixel_values=pixels, return_logits=False)
        kept = torch.stack([attn.kept[0].float().cpu() for attn in attns])  # (layers, rows, N)
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    to_patches = kept.mean(1)  # (layers, N): mean over the answer positions
    share = to_patches.sum(-1)
    per_layer = (to_patches / share.clamp_min(1e-30)[:, None]).view(n_layers, g, g)
    grid = per_layer[chosen].mean(0)
    return Explanation(answer, chosen, per_layer, grid / grid.sum(), share)


def _check_layers(layers, n_layers: int) -> list[int]:
    layers = list(layers)
    bad = [i for i in layers if not -n_layers <= int(i) < n_layers]
    if not layers or bad:
        raise ValueError(f"layers must be decoder layer indices in [-{n_layers}, {n_layers - 1}], got {layers}")
    return [int(i) for i in layers]


# A dark-to-bright ramp (black, purple, red, orange, pale yellow) readable over any image.
_RAMP = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


def colormap(value: float) -> tuple[int, int, int]:
    """A value in [0, 1] -> an RGB colour of _RAMP, linearly interpolated."""
    x = min(1.0, max(0.0, value)) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    t = x - i
    return tuple(round(a + (b - a) * t) for a, b in zip(_RAMP[i], _RAMP[i + 1]))


def heatmap(image: Image.Image, grid: torch.Tensor, alpha: float = 0.55, smooth: bool = True) -> Image.Image:
    """`grid` (g, g), scaled to its maximum, coloured by `colormap` and blended onto `image` at its own size
    (bilinear between patch centres with `smooth`, else one flat block per patch)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    g = grid.float() / grid.max().clamp_min(1e-30)
    lut = [colormap(i / 255) for i in range(256)]
    grey = Image.frombytes("L", (g.shape[1], g.shape[0]), bytes((g * 255).round().byte().flatten().tolist()))
    grey = grey.resize(image.size, Image.BILINEAR if smooth else Image.NEAREST)
    colours = Image.merge("RGB", [grey.point([c[k] for c in lut]) for k in range(3)])
    return Image.blend(image.convert("RGB"), colours, alpha)
