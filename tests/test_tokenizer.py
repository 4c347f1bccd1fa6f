"""Checks cogvlm.tokenizer against goldens from transformers 4.35 slow LlamaTokenizer (legacy=False).

The golden file comes from $COGVLM_TOKENIZER_GOLDEN (default tests/fixtures/tokenizer/golden.json);
the tokenizer.model next to it is used. Every case in the file becomes its own test, so any golden
file of the same format can be run unchanged. Where a case lists ``later_transformers_slow_differs``
the top-level (4.35) value is the one checked.
"""

import json
import os
from pathlib import Path

import pytest

from cogvlm.tokenizer import StreamDecoder, TextStreamer, Tokenizer

GOLDEN = Path(os.environ.get("COGVLM_TOKENIZER_GOLDEN", "tests/fixtures/tokenizer/golden.json"))
if not GOLDEN.is_absolute() and not GOLDEN.exists():  # allow running pytest from another directory
    GOLDEN = Path(__file__).resolve().parent.parent / GOLDEN
MODEL = GOLDEN.parent / "tokenizer.model"
G = json.loads(GOLDEN.read_text(encoding="utf-8"))
ENCODE, DECODE, STREAM = G.get("encode_cases", []), G.get("decode_cases", []), G.get("stream_cases", [])

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(MODEL)


def _params(cases, fields):
    """One test per (case, field) present in the golden, id "case_id:field"."""
    return [pytest.param(c, f, id=f"{c['id']}:{f}") for c in cases for f in fields if f in c]


def _computed(tok, ids, field):
    return {
        "tokens": lambda: tok.convert_ids_to_tokens(ids),
        "decode": lambda: tok.decode(ids),
        "decode_skip_special": lambda: tok.decode(ids, skip_special_tokens=True),
        "cli_demo_response": lambda: tok.decode(ids).split("</s>")[0],
        "prefix_decodes": lambda: [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)],
        "prefix_decodes_skip_special": lambda: [tok.decode(ids[:k], True) for k in range(1, len(ids) + 1)],
        "single_token_decodes": lambda: [tok.decode([i]) for i in ids],
        "text_streamer_chunks": lambda: _run(TextStreamer(tok), ids),
        "text_streamer_chunks_skip_special": lambda: _run(TextStreamer(tok, True), ids),
    }[field]()


def _run(streamer, ids):
    return [streamer.put(i) for i in ids] + [streamer.end()]


# --------------------------------------------------------------------------- goldens
ENCODE_FIELDS = ["ids", "ids_with_special", "pieces", "decode_ids", "decode_ids_with_special",
                 "decode_ids_with_special_skip"]


@pytest.mark.parametrize("case,field", _params(ENCODE, ENCODE_FIELDS))
def test_encode_case(tok, case, field):
    text = case["text"]
    got = {
        "ids": lambda: tok.encode(text, add_special_tokens=False),
        "ids_with_special": lambda: tok.encode(text),
        "pieces": lambda: tok.tokenize(text),
        # decodes start from the golden ids so that a decode bug is not hidden by an encode bug
        "decode_ids": lambda: tok.decode(case["ids"]),
        "decode_ids_with_special": lambda: tok.decode(case["ids_with_special"]),
        "decode_ids_with_special_skip": lambda: tok.decode(case["ids_with_special"], skip_special_tokens=True),
    }[field]()
    assert got == case[field], f"{field} for {text!r}"


DECODE_FIELDS = ["tokens", "decode", "decode_skip_special", "cli_demo_response"]


@pytest.mark.parametrize("case,field", _params(DECODE, DECODE_FIELDS))
def test_decode_case(tok, case, field):
    assert _computed(tok, case["ids"], field) == case[field]


STREAM_FIELDS = DECODE_FIELDS + ["prefix_decodes", "prefix_decodes_skip_special", "single_token_decodes",
                                 "text_streamer_chunks", "text_streamer_chunks_skip_special"]


@pytest.mark.parametrize("case,field", _params(STREAM, STREAM_FIELDS))
def test_stream_case(tok, case, field):
    assert _computed(tok, case["ids"], field) == case[field]


# --------------------------------------------------------------------------- streaming properties
STREAM_IDS = ([pytest.param(c["ids"], id=f"stream:{c['id']}") for c in STREAM]
              + [pytest.param(c["ids"], id=f"decode:{c['id']}") for c in DECODE]
              + [pytest.param(c["ids_with_special"], id=f"encode:{c['id']}") for c in ENCODE])


@pytest.mark.parametrize("skip", [False, True], ids=["keep_special", "skip_special"])
@pytest.mark.parametrize("ids", STREAM_IDS)
def test_stream_decoder_properties(tok, ids, skip):
    full = tok.decode(ids, skip_special_tokens=skip)
    sd = tok.stream(skip_special_tokens=skip)
    assert isinstance(sd, StreamDecoder)
    out = ""
    for i in ids:
        out += sd.put(i)
        # Everything released so far is final text: a prefix of the full decode, so a U+FFFD
        # standing for a not-yet-complete character is never emitted.
        assert full.startswith(out), (out, full)
        assert REPLACEMENT in full or REPLACEMENT not in out
    out += sd.end()
    assert out == full
    # The decoder resets after end() and can be reused.
    assert "".join(sd.put(i) for i in ids) + sd.end() == full


def test_stream_holds_partial_emoji(tok):
    sd = tok.stream()
    assert [sd.put(i) for i in [18585, 29871, 243, 162, 155, 131]] == ["Sure", " ", "", "", "", "😀"]
    assert sd.end() == ""
    sd.put(243)
    assert sd.end() == REPLACEMENT  # a genuinely truncated byte run is flushed by end()


# --------------------------------------------------------------------------- API and errors
def test_attributes(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size) == (1, 2, 0, 0, 32000)
    assert Tokenizer.from_file(MODEL).vocab_size == tok.vocab_size


def test_missing_model_file(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer(path)


def test_not_a_sentencepiece_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"this is not a sentencepiece model\n" * 10)
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer(path)


def test_bad_ids(tok):
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode([1, 2])


@pytest.mark.parametrize("text", ["caf\udce9", "\udcff", "ok \udc80\udc81 then", "\ud800 high surrogate alone"])
def test_text_that_is_not_unicode_is_a_value_error_saying_where(tok, text):
    """Bytes that are not UTF-8 reach us as lone surrogates (argv, surrogateescape reads); sentencepiece would fail
    with `RuntimeError: Unable to cast`. Every lone surrogate, low or high, anywhere in the text."""
    where = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF) + 1
    with pytest.raises(ValueError, match=rf"not valid Unicode: lone surrogate U\+D[89A-F][0-9A-F]{{2}} at character "
                                         rf"{where} "):
        tok.encode(text)
    assert tok.encode(text.encode("utf-8", "replace").decode("utf-8"))  # the repaired text encodes
