"""LoRA over a frozen quantized base (QLoRA): the gradients of a dequantized reference, no full-precision weight kept
for backward, a `cogvlm finetune --preset lora --quantize int4` run whose loss falls, and its export (adapters merged
into the dequantized base) computing what was trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogvlm import CogVLM, shapes
from cogvlm.finetune import TrainConfig
from cogvlm.finetune.trainer import Trainer
from cogvlm.lora import LoRALinear, QuantizedLoRALinear, apply_lora
from cogvlm.quantize import Int4Linear, Int8Linear
from cogvlm.quantize.checkpoint import quantize_checkpoint

from .test_quantize import linear, reference_int4, reference_int8
from .test_quantize_checkpoint import logits

TINY_SHAPES = Path(__file__).resolve().parents[1] / "examples" / "tiny-shapes"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_gradients_equal_lora_over_the_dequantized_weight(mode):
    lin = linear(n_out=48, n_in=128)
    q = Int8Linear.from_linear(lin) if mode == "int8" else Int4Linear.from_linear(lin, True, group_size=32)
    deq = reference_int8(q) if mode == "int8" else reference_int4(q.weight, q.scales, q.zeros)
    plain = torch.nn.Linear(128, 48)
    with torch.no_grad():
        plain.weight.copy_(deq.float())
        plain.bias.copy_(lin.bias)
    torch.manual_seed(0)
    qlora = QuantizedLoRALinear(q, rank=4, alpha=8.0)
    torch.manual_seed(0)
    ref = LoRALinear(plain, rank=4, alpha=8.0)
    with torch.no_grad():
        qlora.lora_B.normal_()  # a trained-looking adapter (B starts at zero)
        ref.lora_B.copy_(qlora.lora_B)
    assert torch.equal(qlora.lora_A, ref.lora_A)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    shapes_saved = []  # what autograd keeps for backward: never a (48, 128) weight
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes_saved.append(tuple(t.shape)) or t, lambda t: t):
        out = qlora(x)
    assert (48, 128) not in shapes_saved
    out.square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qlora.lora_A.grad, ref.lora_A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qlora.lora_B.grad, ref.lora_B.grad, rtol=1e-4, atol=1e-5)
    merged = qlora.merged_linear()  # the dequantized weight plus the update
    torch.testing.assert_close(merged(x.detach()), ref(x.detach()), rtol=1e-5, atol=1e-5)


def test_lora_targets_the_quantized_layers_of_a_quantized_model():
    model = CogVLM.from_pretrained(TINY_SHAPES, device="cpu", dtype=torch.float32, quantize="int8")
    names = apply_lora(model, ["language_expert_qkv"], rank=2)
    assert len(names) == 2 and isinstance(model.llm.layers[0].attn.language_expert_qkv, QuantizedLoRALinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"llm.layers.{i}.attn.language_expert_qkv.lora_{ab}" for i in (0, 1) for ab in "AB"]


def data_file(tmp_path) -> Path:
    """Shapes descriptions in a new wording, so that the trained model has something to learn."""
    jsonl = shapes.generate(tmp_path / "shapes", n=24, seed=5, questions="describe")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for r in records:
        r["conversations"][1]["content"] = "it is " + r["conversations"][1]["content"]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return jsonl


def test_qlora_run_learns_and_exports_a_plain_checkpoint(tmp_path):
    cfg = TrainConfig(data=str(data_file(tmp_path)), out=str(tmp_path / "run"), model=str(TINY_SHAPES),
                      preset="lora", quantize="int4", group_size=32, lora_targets=["llm.layers"], lora_rank=8,
                      lora_dropout=0.0, lr=1e-2, steps=8, batch_size=4, warmup_steps=0, gradient_checkpointing=True,
                      device="cpu", export=False, log_every=100)
    trainer = Trainer(cfg)
    assert isinstance(trainer.model.llm.layers[0].mlp.language_expert.down.base, Int4Linear)
    history = trainer.run()["history"]
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0], losses
    trained = logits(trainer.model.eval())

    final = trainer.export()
    meta = json.loads((final / "cogvlm_config.json").read_text())
    assert "quantization" not in meta  # plain weights: the adapters merged into the dequantized base
    exported = CogVLM.from_pretrained(final, device="cpu", dtype=torch.float32)
    assert type(exported.llm.layers[0].mlp.language_expert.down) is torch.nn.Linear
    exported_logits = logits(exported)
    scale = trained.abs().max().item()
    assert (exported_logits - trained).abs().max().item() < 1e-3 * scale  # fp16 export rounding only

    requantized = quantize_checkpoint(final, tmp_path / "int4-again", "int4", 32)  # "and can re-quantize"
    assert CogVLM.from_pretrained(requantized, device="cpu").quantization.mode == "int4"


def test_quantize_needs_the_lora_preset(tmp_path):
    cfg = TrainConfig(data=str(data_file(tmp_path)), out=str(tmp_path / "run"), model=str(TINY_SHAPES),
                      preset="experts", quantize="int8", steps=1, device="cpu")
    with pytest.raises(ValueError, match="--quantize trains LoRA adapters over a frozen quantized base: it needs "
                                         "--preset lora"):
        Trainer(cfg)
