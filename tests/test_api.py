"""The Python API: from_pretrained on every kind of local folder, the tokenizer it attaches, and every bad input
answered by a clear error before any model compute."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from PIL import Image

import cogvlm.hub as hub
from cogvlm import CogVLM
from cogvlm.convert import CheckpointError, convert

from .test_generate import FIXTURES, MANIFEST, SINGLE, TOKENIZER, conversation

MODEL_DIR = FIXTURES / MANIFEST.get("model_dir", "model")
IMAGE = FIXTURES / MANIFEST["images"][0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> CogVLM:
    out = convert(MODEL_DIR, tmp_path_factory.mktemp("api") / "converted", tokenizer=TOKENIZER)
    return CogVLM.from_pretrained(out, device="cpu")


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if the model runs: errors must come before any compute."""
    def forward(*args, **kwargs):
        raise AssertionError("the model ran before the input was rejected")

    monkeypatch.setattr(CogVLM, "forward", forward)


def test_converted_folder_gets_its_tokenizer(model):
    assert model.tokenizer is not None and model.tokenizer.vocab_size == model.cfg.text.vocab_size
    assert next(model.parameters()).dtype == torch.float32  # CPU default


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    bare = CogVLM.from_pretrained(convert(MODEL_DIR, tmp_path / "bare"), device="cpu")
    assert bare.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer.*--tokenizer"):
        bare.chat(IMAGE, "What is this?")
    with pytest.raises(ValueError, match="no tokenizer"):
        list(bare.stream_chat(IMAGE, "What is this?"))
    given = CogVLM.from_pretrained(tmp_path / "bare", device="cpu", tokenizer=TOKENIZER)
    assert given.tokenizer is not None and isinstance(given.chat(IMAGE, "What is this?", max_new_tokens=2), str)
    with pytest.raises(CheckpointError, match="does not exist"):
        CogVLM.from_pretrained(tmp_path / "bare", device="cpu", tokenizer=tmp_path / "nope.model")


def test_local_hub_layout_folder_is_converted_once_into_the_cache(tmp_path, monkeypatch, model):
    monkeypatch.setenv("COGVLM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "cogvlm-tiny-hf"
    shutil.copytree(MODEL_DIR, src)
    shutil.copyfile(TOKENIZER, src / "tokenizer.model")
    first = CogVLM.from_pretrained(src, device="cpu")
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith("local--cogvlm-tiny-hf--") and (cached / "tokenizer.model").exists()
    assert first.tokenizer is not None

    calls = []
    real_convert = hub.convert
    monkeypatch.setattr(hub, "convert", lambda *a, **k: calls.append(a) or real_convert(*a, **k))
    second = CogVLM.from_pretrained(src, device="cpu")
    assert calls == [], "the cached conversion was not reused"
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    conv = conversation(SINGLE[0])
    assert second.chat(**conv, max_new_tokens=4) == model.chat(**conv, max_new_tokens=4)

    # A checkpoint changed in place (its weights' mtime) is converted again, into a new cache entry.
    weights = next(src.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    CogVLM.from_pretrained(src, device="cpu")
    assert len(calls) == 1 and len(list((tmp_path / "cache").iterdir())) == 2


def test_bf16_generation_runs(tmp_path):
    half = CogVLM.from_pretrained(convert(MODEL_DIR, tmp_path / "m", tokenizer=TOKENIZER), device="cpu", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert len(half.generate(**_batch(half), max_new_tokens=3)[0]) == 3


def _batch(m):
    from cogvlm.chat import build_batch

    return build_batch(m, [IMAGE], ["What is this?"], None, "chat")


def test_image_sources_and_text_only(model):
    as_path = model.chat(IMAGE, "What is this?", max_new_tokens=3)
    assert model.chat(str(IMAGE), "What is this?", max_new_tokens=3) == as_path
    assert model.chat(IMAGE.read_bytes(), "What is this?", max_new_tokens=3) == as_path
    assert model.chat(Image.open(IMAGE), "What is this?", max_new_tokens=3) == as_path
    assert model.chat([IMAGE], "What is this?", max_new_tokens=3) == as_path  # the reference's images=[image]
    assert isinstance(model.chat(None, "The capital of France is", template="base", max_new_tokens=3), str)


# -- every bad input, with its clear error and no compute -----------------------------------------------------------

def test_second_image_is_an_error(model, no_compute):
    with pytest.raises(ValueError, match="at most one image per conversation, got 2"):
        model.chat([IMAGE, IMAGE], "Compare them.")
    with pytest.raises(ValueError, match="at most one image"):
        model.chat_batch([IMAGE, [IMAGE, IMAGE]], ["a?", "b?"])
    # Token level: a row with two images' worth of image positions.
    batch = _batch(model)
    n = model.cfg.num_image_tokens
    ids = torch.cat([batch["input_ids"][:, :1 + n], batch["input_ids"][:, 1:]], 1)
    types = torch.cat([batch["token_type_ids"][:, :1 + n], batch["token_type_ids"][:, 1:]], 1)
    with pytest.raises(ValueError, match="at most one image per conversation"):
        model.generate(ids, types, pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="pixel_values holds 0"):
        model.generate(batch["input_ids"], batch["token_type_ids"])


def test_too_long_prompt_is_an_error(model, no_compute):
    limit = model.cfg.text.max_position_embeddings
    with pytest.raises(ValueError, match=f"over the limit of {limit}"):
        model.chat(IMAGE, "word " * limit)
    with pytest.raises(ValueError, match=f"max_position_embeddings \\({limit}\\).*at most \\d+ new tokens"):
        model.chat(IMAGE, "What is this?", max_new_tokens=limit)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.stream_chat(IMAGE, "What is this?", max_new_tokens=limit)  # at the call, not at the first piece
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.ones(1, limit, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        model.chat(IMAGE, "What is this?", max_new_tokens=0)


def test_unknown_template_is_an_error(model, no_compute):
    with pytest.raises(ValueError, match="unknown template 'chatty'.*base, chat, vqa"):
        model.chat(IMAGE, "What is this?", template="chatty")


def test_bad_sampling_settings_are_errors(model, no_compute):
    for bad, match in [(dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"),
                       (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty")]:
        with pytest.raises(ValueError, match=match):
            model.chat(IMAGE, "What is this?", do_sample=True, **bad)


def test_mismatched_batch_lists_are_an_error(model, no_compute):
    with pytest.raises(ValueError, match="2 images but 1 queries"):
        model.chat_batch([IMAGE, IMAGE], ["a?"])


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder, and not a hub id"):
        CogVLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither a converted cogvlm folder"):
        CogVLM.from_pretrained(tmp_path)
