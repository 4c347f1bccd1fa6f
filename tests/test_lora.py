"""cogvlm.lora: name patterns, LoRA as a module swap, and merging, on the converted fixture model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cogvlm.convert import convert
from cogvlm.finetune import save_model
from cogvlm.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from cogvlm.swap import compile_pattern, matches, select
from cogvlm import CogVLM

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASE = "case1_chat_image" if "case1_chat_image" in MANIFEST["cases"] else sorted(MANIFEST["cases"])[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert(FIXTURES / MANIFEST.get("model_dir", "model"), tmp_path_factory.mktemp("lora") / "m", dtype="fp32")


def load(converted) -> CogVLM:
    return CogVLM.from_pretrained(converted, device="cpu", dtype=torch.float32)


def case_inputs():
    case = load_file(str(FIXTURES / f"{CASE}.safetensors"))
    return {k: case.get(k) for k in ("input_ids", "token_type_ids", "attention_mask", "pixel_values")}


NAMES = [
    "vision.layers.0.attn.qkv", "vision.layers.0.mlp.fc1", "vision.layers.46.mlp.fc1", "vision.layers.54.mlp.fc2",
    "vision.layers.55.mlp.fc1", "llm.layers.3.attn.vision_expert_qkv", "llm.layers.3.attn.language_expert_qkv",
    "llm.layers.3.attn.vision_expert_dense", "llm.layers.3.mlp.vision_expert.gate_up", "adapter.proj",
]


def test_patterns():
    def sel(p):
        return [n for n in NAMES if matches(p, n)]

    assert sel("vision_expert_qkv") == ["llm.layers.3.attn.vision_expert_qkv"]  # a bare component, anywhere
    assert sel("vision.layers[46:55].mlp") == ["vision.layers.46.mlp.fc1", "vision.layers.54.mlp.fc2"]
    assert sel("vision.layers[:1]") == ["vision.layers.0.attn.qkv", "vision.layers.0.mlp.fc1"]
    assert sel("layers[46,55].mlp.fc1") == ["vision.layers.46.mlp.fc1", "vision.layers.55.mlp.fc1"]
    assert sel("vision.layers[50:]") == ["vision.layers.54.mlp.fc2", "vision.layers.55.mlp.fc1"]
    assert sel("llm.layers.*.attn.*_dense") == ["llm.layers.3.attn.vision_expert_dense"]
    assert sel("*qkv") == ["vision.layers.0.attn.qkv", "llm.layers.3.attn.vision_expert_qkv",
                           "llm.layers.3.attn.language_expert_qkv"]
    assert sel("vision") == NAMES[:5]  # whole components: not vision_expert_*
    assert sel("vision_expert*") == ["llm.layers.3.attn.vision_expert_qkv", "llm.layers.3.attn.vision_expert_dense",
                                     "llm.layers.3.mlp.vision_expert.gate_up"]
    assert sel("mlp.vision_expert") == ["llm.layers.3.mlp.vision_expert.gate_up"]
    assert matches("adapter", "adapter.proj.weight") and not matches("adapter", "adapterx.proj")
    for bad in ("layers[a:b]", "layers[-1]", "layers[3:3]", "layers[1", ""):
        with pytest.raises(ValueError):
            compile_pattern(bad)
    with pytest.raises(ValueError, match="matches no linear layer"):
        select(["vision_expert_qvk"], NAMES, "linear layer")


def test_apply_lora_swaps_modules_and_keeps_parameter_names(converted):
    model = load(converted)
    before = dict(model.named_parameters())
    wrapped = apply_lora(model, rank=4, alpha=8)
    n_layers = model.cfg.text.num_hidden_layers
    assert wrapped == [f"llm.layers.{i}.attn.{k}" for i in range(n_layers)
                       for k in ("vision_expert_qkv", "vision_expert_dense")]
    for name in wrapped:
        m = model.get_submodule(name)
        assert isinstance(m, LoRALinear) and isinstance(m, nn.Linear)
        assert m.weight is before[name + ".weight"]  # the same Parameter object, no copy
        assert m.lora_A.shape == (4, m.in_features) and m.lora_B.shape == (m.out_features, 4)
        assert m.lora_A.requires_grad and m.lora_B.requires_grad and not m.weight.requires_grad
    after = dict(model.named_parameters())
    assert set(after) - set(before) == {f"{n}.lora_{x}" for n in wrapped for x in "AB"}
    assert set(lora_state_dict(model)) == set(after) - set(before)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_fresh_adapters_change_nothing(converted):
    model, inputs = load(converted), case_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
        apply_lora(model, ["vision_expert_qkv", "language_expert_dense", "vision.layers[0:2].mlp"], rank=4)
        assert torch.equal(model(**inputs).logits, ref)  # B = 0


def test_merge_gives_the_same_outputs_as_unmerged_adapters(converted):
    model, inputs = load(converted), case_inputs()
    keys = list(model.state_dict())
    with torch.no_grad():
        base = model(**inputs).logits
    targets = ["vision_expert_qkv", "vision_expert_dense", "language_expert_qkv", "vision.layers[0:2].mlp",
               "llm.layers.*.mlp.*.down", "adapter.gate_up"]
    wrapped = apply_lora(model, targets, rank=4, alpha=8, dropout=0.1)
    assert any(n.startswith("vision.") for n in wrapped) and "adapter.gate_up" in wrapped
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # non-trivial adapters
        model.eval()  # dropout off
        unmerged = model(**inputs).logits
        assert (unmerged - base).abs().max() > 1e-3  # the adapters do change the output
        merged_names = merge_lora(model)
        merged = model(**inputs).logits
    assert sorted(merged_names) == sorted(wrapped)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(model.state_dict()) == keys  # exactly the checkpoint layout again
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_merged_model_exports_and_loads(converted, tmp_path):
    model, inputs = load(converted), case_inputs()
    apply_lora(model, rank=2, alpha=2)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.05)
        expected = model(**inputs).logits
    with pytest.raises(ValueError, match="unmerged LoRA"):
        save_model(model, tmp_path / "x")
    merge_lora(model)
    out = save_model(model, tmp_path / "merged", tokenizer=None)
    with torch.no_grad():
        got = CogVLM.from_pretrained(out, device="cpu", dtype=torch.float32)(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training(converted):
    model, inputs = load(converted), case_inputs()
    apply_lora(model, rank=4, dropout=0.5)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
        model.eval()
        a, b = model(**inputs).logits, model(**inputs).logits
        model.train()
        c = model(**inputs).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lora_gradients_reach_only_adapters(converted):
    model, inputs = load(converted), case_inputs()
    apply_lora(model, rank=4, dtype=torch.float32)
    model.train()
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_A") or name.endswith("lora_B"):
            assert p.grad is not None, name  # B gets a gradient at once; A through B once B != 0
        else:
            assert p.grad is None, name
