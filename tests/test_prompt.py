"""cogvlm.prompt: templates, input ids, token types, labels and left-padded batches vs the reference fixtures."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvlm.layout import image_token_count
from cogvlm.prompt import TEMPLATES, build_inputs, format_prompt, pad_batch
from cogvlm.tokenizer import Tokenizer

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
TOKENIZER_MODEL = Path(
    os.environ.get("COGVLM_TOKENIZER", Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model")
)
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = MANIFEST["cases"]
VISION = MANIFEST["config"]["vision_config"]
N_IMAGE = image_token_count(VISION["image_size"], VISION["patch_size"])

PROMPT_CASES = [n for n, c in CASES.items() if "template_version" in c and "query" in c]
TRAIN_CASES = [n for n, c in CASES.items() if "answer_text" in c and "based_on" in c]
BATCH_CASES = [n for n, c in CASES.items() if "rows" in c]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER_MODEL)


def tensors(name):
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def inputs_for(tok, name, **kw):
    c = CASES[name]
    return build_inputs(tok, c["query"], c["history"], c["template_version"],
                        num_image_tokens=N_IMAGE if c.get("image") else None, **kw)


def test_fixture_has_cases():
    assert PROMPT_CASES and TRAIN_CASES and BATCH_CASES


def test_image_token_count():
    assert image_token_count(56, 14) == 18
    assert image_token_count(490, 14) == 35 * 35 + 2  # the real CogVLM-17B: 1227 positions


@pytest.mark.parametrize("name", PROMPT_CASES)
def test_prompt_text_and_ids(tok, name):
    c = CASES[name]
    history = [tuple(turn) for turn in c["history"]]
    assert format_prompt(c["query"], history, c["template_version"]) == c["prompt_text"]
    assert tok.encode(c["prompt_text"], add_special_tokens=False) == c["text_ids"]


@pytest.mark.parametrize("name", PROMPT_CASES)
def test_build_inputs_matches_reference(tok, name):
    t = tensors(name)
    assert t["input_ids"].shape[0] == 1
    got = inputs_for(tok, name)
    assert set(got) == {"input_ids", "token_type_ids", "attention_mask"}
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert got[k].dtype == torch.long and got[k].dim() == 1
        assert torch.equal(got[k], t[k][0]), k


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_training_labels_match_reference(tok, name):
    c = CASES[name]
    t = tensors(name)
    got = inputs_for(tok, c["based_on"], answer=c["answer_text"])
    for k in ("input_ids", "token_type_ids", "attention_mask", "labels"):
        assert torch.equal(got[k], t[k][0]), k
    answer = c["answer_ids_with_eos"]
    assert got["labels"][-len(answer):].tolist() == answer
    assert (got["labels"][: -len(answer)] == -100).all()


@pytest.mark.parametrize("name", BATCH_CASES)
def test_pad_batch_matches_reference(tok, name):
    t = tensors(name)
    got = pad_batch([inputs_for(tok, row) for row in CASES[name]["rows"]], side="left")
    assert set(got) == {"input_ids", "token_type_ids", "attention_mask"}
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(got[k], t[k]), k


def test_pad_batch_right_and_labels():
    a = {"input_ids": [1, 5, 6], "token_type_ids": [0, 1, 0], "labels": [-100, -100, 6]}
    b = {"input_ids": torch.tensor([1, 7]), "token_type_ids": torch.tensor([0, 0]), "labels": torch.tensor([-100, 2])}
    left = pad_batch([a, b])
    assert left["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert left["labels"].tolist() == [[-100, -100, 6], [-100, -100, 2]]
    right = pad_batch([a, b], pad_id=9, side="right")
    assert right["input_ids"].tolist() == [[1, 5, 6], [1, 7, 9]]
    assert right["token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([a], side="middle")
    with pytest.raises(ValueError, match="labels"):
        pad_batch([a, {"input_ids": [1]}])


def test_templates():
    assert TEMPLATES == ("base", "chat", "vqa")
    h = [("q1", "a1")]
    assert format_prompt("q", h, "base") == "q"  # the reference ignores history for base
    assert format_prompt("q", h, "chat") == "Question: q1 Answer: a1\nQuestion: q Answer:"
    assert format_prompt("q", h, "vqa") == "Question: q1 Short answer: a1\nQuestion: q Short answer:"
    assert format_prompt("q", None, "chat") == "Question: q Answer:"


def test_unknown_template(tok):
    with pytest.raises(ValueError, match="'chatml'.*base, chat, vqa"):
        format_prompt("q", None, "chatml")
    with pytest.raises(ValueError, match="base, chat, vqa"):
        build_inputs(tok, "q", template="chatml")


def test_text_only_has_no_image_positions(tok):
    got = build_inputs(tok, "hello", template="base")
    assert got["input_ids"].tolist() == [tok.bos_id] + tok.encode("hello", add_special_tokens=False)
    assert got["token_type_ids"].sum() == 0


def test_too_long(tok):
    query = "word " * 100
    n_text = len(tok.encode(format_prompt(query, None, "chat"), add_special_tokens=False))
    total = 1 + N_IMAGE + n_text
    assert len(build_inputs(tok, query, num_image_tokens=N_IMAGE, max_length=total)["input_ids"]) == total
    with pytest.raises(ValueError, match=rf"{total} tokens.*limit of {total - 1}.*shorten the query or the history"):
        build_inputs(tok, query, num_image_tokens=N_IMAGE, max_length=total - 1)
    with pytest.raises(ValueError, match="or the answer"):
        build_inputs(tok, query, num_image_tokens=N_IMAGE, answer="yes", max_length=total)
