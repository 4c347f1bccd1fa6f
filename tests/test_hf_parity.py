"""Tensor-for-tensor parity with the Hugging Face reference, on golden fixtures made from it with random weights.

The fixture folder comes from COGVLM_FIXTURES (default tests/fixtures/hf_reference); its manifest.json drives
everything, so any fixture set of the same format (other sizes, weights, cases) runs through this file unchanged.
The checkpoint goes through the real converter and loader; every stored stage of every case is compared in fp32.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvlm.convert import convert, name_table, to_hub
from cogvlm.generate import DecodeSession
from cogvlm.layout import build_position_ids
from cogvlm import CogVLM
from cogvlm.visual_expert import vision_expert_mask

from .conftest import record_error

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = sorted(MANIFEST["cases"])
TOL = dict(atol=1e-4, rtol=1e-4)

INPUTS = {"input_ids", "token_type_ids", "attention_mask", "pixel_values", "labels", "logits_sel_vocab_ids"}
EXACT = {"position_ids", "vision_expert_mask", "logits_argmax", "gen_ids", "gen_step_position_ids",
         "gen_step_token_type_ids"}


def load_case(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def is_training_case(name: str) -> bool:
    return "labels" in load_case(name)


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    actual = actual.detach().to(expected.dtype)
    assert actual.shape == expected.shape, f"{where} {name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{where} {name}: integer tensors differ"
        return
    err = (actual - expected).abs().max().item()
    record_error(f"{where}:{name}", err, err / max(expected.abs().max().item(), 1e-30))
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{where} {name}: {m}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity") / "converted"
    return convert(FIXTURES / MANIFEST.get("model_dir", "model"), out, dtype="fp32")


@pytest.fixture(scope="module")
def model(converted) -> CogVLM:
    return CogVLM.from_pretrained(converted, device="cpu", dtype=torch.float32)


def inputs_of(case: dict) -> dict:
    return dict(
        input_ids=case["input_ids"],
        token_type_ids=case["token_type_ids"],
        attention_mask=case["attention_mask"],
        pixel_values=case.get("pixel_values"),
    )


def valid_rows(case: dict, tensor: torch.Tensor) -> torch.Tensor | None:
    """Boolean (B, L) index of non-pad rows for (B, L, ...) tensors of a padded case; pad rows are garbage in both."""
    mask = case["attention_mask"].bool()
    if mask.all() or tuple(tensor.shape[:2]) != tuple(mask.shape):
        return None
    return mask


@pytest.mark.parametrize("name", CASES)
def test_every_stored_tensor_is_checked(name):
    """Guards against a stage silently going unchecked when a fixture set adds tensors."""
    checked = INPUTS | EXACT | {"loss"}
    stages = {"vit_patch_embed_out", "vit_final_out", "adapter_glu_out", "adapter_out_with_boi_eoi",
              "inputs_embeds", "final_norm_out", "logits_last_full", "logits_sel", "logits_logsumexp",
              "gen_step_logits_full", "gen_step_logits_sel", "gen_step_logits_logsumexp"}
    for key in load_case(name):
        known = key in checked or key in stages or key.startswith(("vit_layer", "decoder_layer", "grad."))
        assert known, f"{name}: fixture tensor {key!r} is not compared by this test"


@pytest.mark.parametrize("name", [c for c in CASES if not is_training_case(c)])
def test_forward_stages(model, name):
    case = load_case(name)
    inputs = inputs_of(case)
    compare("position_ids", build_position_ids(inputs["token_type_ids"], inputs["attention_mask"]),
            case["position_ids"], name)
    if "vision_expert_mask" in case:
        compare("vision_expert_mask", vision_expert_mask(inputs["token_type_ids"]).long(),
                case["vision_expert_mask"].long(), name)

    trace: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = model(**inputs, trace=trace).logits  # (B, L, V)
    vocab = case["logits_sel_vocab_ids"]
    trace.update(
        logits_sel=logits[..., vocab],
        logits_logsumexp=logits.logsumexp(-1),
        logits_argmax=logits.argmax(-1),
        logits_last_full=logits[:, -1],
    )
    stages = [k for k in case if k not in INPUTS | {"position_ids", "vision_expert_mask"} and not k.startswith("gen_")]
    for key in stages:
        assert key in trace, f"{name}: the model produced no {key!r}"
        actual, expected = trace[key], case[key]
        rows = valid_rows(case, expected)
        if rows is not None:
            actual, expected = actual[rows], expected[rows]
        compare(key, actual, expected, name)


@pytest.mark.parametrize("name", [c for c in CASES if "gen_ids" in load_case(c)])
def test_cached_greedy_decode(model, name):
    case = load_case(name)
    B, L = case["input_ids"].shape
    steps = case["gen_ids"].shape[1]
    vocab = case["logits_sel_vocab_ids"]
    session = DecodeSession(model, B, L + steps)
    logits = session.prefill(**inputs_of(case))
    for k in range(steps):
        where = f"{name} step {k}"
        compare("gen_step_position_ids", session.last_positions, case["gen_step_position_ids"][:, k], where)
        if "gen_step_token_type_ids" in case:  # every decode step is a text token
            compare("gen_step_token_type_ids", torch.zeros(B, dtype=torch.long),
                    case["gen_step_token_type_ids"][:, k], where)
        if "gen_step_logits_full" in case:
            compare("gen_step_logits_full", logits, case["gen_step_logits_full"][:, k], where)
        compare("gen_step_logits_sel", logits[:, vocab], case["gen_step_logits_sel"][:, k], where)
        compare("gen_step_logits_logsumexp", logits.logsumexp(-1), case["gen_step_logits_logsumexp"][:, k], where)
        tokens = logits.argmax(-1)
        compare("gen_ids", tokens, case["gen_ids"][:, k], where)
        if k + 1 < steps:
            logits = session.step(tokens)


@pytest.mark.parametrize("name", [c for c in CASES if is_training_case(c)])
def test_training_loss_and_grads(converted, name):
    model = CogVLM.from_pretrained(converted, device="cpu", dtype=torch.float32).train()
    model.requires_grad_(True)
    case = load_case(name)
    compare("position_ids", build_position_ids(case["token_type_ids"], case["attention_mask"]),
            case["position_ids"], name)
    loss = model(**inputs_of(case), labels=case["labels"]).loss
    compare("loss", loss.reshape(case["loss"].shape), case["loss"], name)
    loss.backward()

    params = dict(model.named_parameters())
    hub_grads = {}
    for entry in name_table(model.cfg):
        hub_grads.update(to_hub(entry, params[entry.ours].grad))
    grads = [k for k in case if k.startswith("grad.")]
    assert grads, f"{name} stores no gradients"
    for key in grads:
        compare(key, hub_grads[key.removeprefix("grad.")], case[key], name)
