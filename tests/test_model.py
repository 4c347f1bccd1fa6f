"""The known traps of CogVLM, each as a named test, and cache consistency on the converted fixture model."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvlm.config import CogVLMConfig, TextConfig, VisionConfig
from cogvlm.convert import convert
from cogvlm.generate import DecodeSession
from cogvlm.llm import RMSNorm
from cogvlm.layout import build_position_ids
from cogvlm import CogVLM
from cogvlm.visual_expert import ExpertRoute, SwiGLU, route, vision_expert_mask
from cogvlm.vit import VisionBlock

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
N_IMG = 4  # image positions in the hand-made sequences below: boi, 2 patches, eoi


def image_prompt_types(n_text: int = 3) -> torch.Tensor:
    return torch.tensor([[0] + [1] * N_IMG + [0] * n_text])  # bos, image, text


def test_eoi_token_uses_the_language_expert():
    mask = vision_expert_mask(image_prompt_types())[0].tolist()
    assert mask == [False, True, True, True, False, False, False, False]  # boi + patches vision, eoi language


def test_last_position_is_always_language():
    assert not vision_expert_mask(torch.ones(1, 5, dtype=torch.long))[0, -1]


def test_route_slices_a_shared_span_and_gathers_otherwise():
    one = image_prompt_types()
    assert ExpertRoute.from_token_types(one).span == (1, N_IMG)  # boi + patches; eoi is language
    assert ExpertRoute.from_token_types(one.repeat(3, 1)).span == (1, N_IMG)  # a batch of one prompt
    left_padded = torch.cat([one, torch.tensor([[0] + one[0, :-1].tolist()])])  # the image one position later
    assert ExpertRoute.from_token_types(left_padded).span is None
    two_images = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 0]])  # vision positions 1-2 and 5-6: not one span
    assert ExpertRoute.from_token_types(two_images).span is None
    assert ExpertRoute.from_token_types(torch.zeros(2, 6, dtype=torch.long)) is None  # all text: no route


def test_route_by_span_computes_what_the_gathers_compute():
    torch.manual_seed(0)
    D = 16
    experts = [SwiGLU(D, 24), SwiGLU(D, 24)]
    for types in (image_prompt_types(), image_prompt_types().repeat(3, 1), torch.tensor([[1, 1, 1, 0, 0]])):
        spanned = ExpertRoute.from_token_types(types)
        gathered = ExpertRoute(spanned.vision, spanned.language, spanned.inverse, span=None)
        assert spanned.span is not None
        x = torch.randn(*types.shape, D)
        want = torch.empty(*types.shape, D)  # each token through its own expert, one at a time
        mask = vision_expert_mask(types)
        for b, t in itertools.product(*map(range, types.shape)):
            want[b, t] = experts[0 if mask[b, t] else 1](x[b, t][None])[0]
        for r in (spanned, gathered):
            got = route(x, r, *experts)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
        assert torch.equal(route(x, spanned, *experts), route(x, gathered, *experts))


def test_image_patches_share_one_position_id():
    pos = build_position_ids(image_prompt_types())[0].tolist()
    assert pos == [0, 1, 2, 2, 3, 4, 5, 6]  # bos, boi, patches share 2, eoi 3, text goes on


def test_left_padding_puts_bos_at_position_one():
    types = torch.tensor([[0, 0] + image_prompt_types()[0].tolist()])
    mask = torch.tensor([[0, 0] + [1] * (types.shape[1] - 2)])
    assert build_position_ids(types, mask)[0].tolist() == [0, 0, 1, 2, 3, 3, 4, 5, 6, 7]


def test_rmsnorm_in_fp32_cast_after_weight_multiply():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(64)).bfloat16()
    x = (3 * torch.randn(2, 5, 64)).bfloat16()
    xf = x.float()
    expected = (norm.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))).bfloat16()
    cast_first = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert not torch.equal(out, cast_first)  # the order matters, so this test can tell


def test_vit_layernorm_comes_after_each_sublayer():
    """With zeroed LayerNorms a post-sublayer block adds nothing; a pre-norm block would still add its biases."""
    torch.manual_seed(0)
    block = VisionBlock(VisionConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_hidden_layers=1,
                                     image_size=28, num_positions=5))
    for norm in (block.attn_norm, block.mlp_norm):
        torch.nn.init.zeros_(norm.weight)
        torch.nn.init.zeros_(norm.bias)
    x = torch.randn(2, 5, 32)
    assert torch.equal(block(x, torch.float32), x)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> CogVLM:
    out = convert(FIXTURES / MANIFEST.get("model_dir", "model"), tmp_path_factory.mktemp("m") / "ours")
    return CogVLM.from_pretrained(out, device="cpu", dtype=torch.float32)


def image_case() -> dict:
    name = next(c for c, m in MANIFEST["cases"].items() if m.get("image") and not m.get("rows"))
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def test_prefill_plus_one_cached_step_equals_full_forward(model):
    case = image_case()
    ids, types, pixels = case["input_ids"], case["token_type_ids"], case["pixel_values"]
    full = model(ids, types, pixel_values=pixels).logits[:, -1]
    session = DecodeSession(model, 1, ids.shape[1])
    session.prefill(ids[:, :-1], types[:, :-1], pixel_values=pixels)
    step = session.step(ids[:, -1])
    torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-5)


def test_left_padded_batch_equals_rows_alone(model):
    case = image_case()
    ids, types, pixels = case["input_ids"], case["token_type_ids"], case["pixel_values"]
    text = torch.tensor([[1, 450, 7483, 310]])  # a shorter text-only row would break the one-image-per-row rule,
    short_ids, short_types = ids[:, :-3], types[:, :-3]  # so the second row is the same image prompt, cut shorter
    pad = ids.shape[1] - short_ids.shape[1]
    batch_ids = torch.cat([ids, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], 1)])
    batch_types = torch.cat([types, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_types], 1)])
    mask = torch.ones_like(batch_ids)
    mask[1, :pad] = 0
    out = model(batch_ids, batch_types, mask, torch.cat([pixels, pixels])).logits[:, -1]
    torch.testing.assert_close(out[0], model(ids, types, pixel_values=pixels).logits[0, -1], atol=2e-5, rtol=1e-5)
    alone = model(short_ids, short_types, pixel_values=pixels).logits[0, -1]
    torch.testing.assert_close(out[1], alone, atol=2e-5, rtol=1e-5)
    assert model(text).logits.isfinite().all()


def test_image_count_mismatch_is_a_clear_error(model):
    case = image_case()
    with pytest.raises(ValueError, match="image positions"):
        model(case["input_ids"], case["token_type_ids"], pixel_values=torch.cat([case["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(case["input_ids"], case["token_type_ids"])


@pytest.mark.parametrize("name", ["cogvlm-chat-hf", "cogvlm-base-490-hf", "cogvlm-base-224-hf",
                                  "THUDM/cogvlm-grounding-generalist-hf"])
def test_published_variants_build_from_presets(name):
    cfg = CogVLMConfig.from_name(name)
    assert CogVLMConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with torch.device("meta"):
        n = sum(p.numel() for p in CogVLM(cfg).parameters())
    assert 17.0e9 < n < 18.0e9  # CogVLM-17B
    assert cfg.num_image_tokens == (cfg.vision.image_size // 14) ** 2 + 2


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_positions"):
        VisionConfig(image_size=224)
    with pytest.raises(ValueError, match="divisible"):
        TextConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="not a CogVLM config"):
        CogVLMConfig.from_hf_dict({"model_type": "llama"})
