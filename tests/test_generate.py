"""Generation: HF's logits processors on hand-computed examples, and the reference's greedy tokens end to end.

The end-to-end tests start from the manifest's conversation (query, history, template, image file), go through the
real tokenizer, the real converter and `model.chat`, and must give the fixtures' `gen_ids` exactly. The fixture folder
comes from COGVLM_FIXTURES (default tests/fixtures/hf_reference), as in test_hf_parity.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cogvlm.generate as gen
from cogvlm import CogVLM
from cogvlm.chat import TextStream, build_batch
from cogvlm.convert import convert
from cogvlm.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, process_logits

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TOKENIZER = Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model"
INF = float("inf")


def case_tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def gen_steps(name: str) -> int | None:
    shape = MANIFEST["cases"][name]["tensors"].get("gen_ids", {}).get("shape")
    return None if shape is None else shape[1]


SINGLE = sorted(n for n, c in MANIFEST["cases"].items() if "query" in c and gen_steps(n)
                and c["tensors"]["input_ids"]["shape"][0] == 1)
BATCHED = sorted(n for n, c in MANIFEST["cases"].items() if c.get("rows") and gen_steps(n))


def conversation(name: str) -> dict:
    """chat() arguments of a single-row manifest case."""
    c = MANIFEST["cases"][name]
    image = FIXTURES / c["image"] if c.get("image") else None
    return dict(image=image, query=c["query"], history=[tuple(t) for t in c["history"]],
                template=c["template_version"])


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    """What generation returns: everything up to and including the first eos."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> CogVLM:
    out = convert(FIXTURES / MANIFEST.get("model_dir", "model"), tmp_path_factory.mktemp("gen") / "converted",
                  dtype="fp32", tokenizer=TOKENIZER)
    return CogVLM.from_pretrained(out, device="cpu", dtype=torch.float32)


# -- logits processors: tiny examples worked out by hand with HF's definitions --------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]
    assert logits.tolist()[0] == [2.0, -1.0, 0.5, 3.0]  # not modified in place


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
    assert apply_top_k(logits, 1).tolist() == [[-INF, 3.0, -INF, 3.0]]  # a tie with the k-th stays, as in HF
    assert apply_top_k(logits, 3).tolist() == [[-INF, 3.0, 2.0, 3.0]]
    assert apply_top_k(logits, 10).tolist() == logits.tolist()  # k above the vocabulary keeps everything


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.1, 0.2, 0.3, 0.4; ascending cumulative 0.1, 0.3, 0.6, 1.0; HF drops cumulative <= 1 - p
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    kept = lambda p: (apply_top_p(logits, p) > -INF).tolist()[0]  # noqa: E731
    assert kept(0.3) == [False, False, False, True]  # 0.4 >= 0.3
    assert kept(0.65) == [False, False, True, True]  # 0.4 + 0.3 = 0.7 >= 0.65
    assert kept(0.75) == [False, True, True, True]  # 0.7 < 0.75, so 0.2 is needed too
    assert kept(0.01) == [False, False, False, True]  # min_tokens_to_keep = 1
    assert kept(1.0) == [True, True, True, True]
    torch.testing.assert_close(apply_top_p(logits, 0.65)[0, 2:], logits[0, 2:])  # kept logits are untouched


def test_processors_run_in_hf_order():
    logits = torch.tensor([[4.0, 2.0, -1.0, 1.0]])
    seen = torch.tensor([[True, False, True, False]])
    # penalty 2: [2, 2, -2, 1]; temperature 0.5: [4, 4, -4, 2]; top-k 3 drops -4; top-p 0.9: the probabilities of
    # [4, 4, 2] are 0.468, 0.468, 0.063, and the ascending cumulative 0.063 <= 0.1 drops the last one
    out = process_logits(logits, seen, do_sample=True, temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=2.0)
    assert out.tolist() == [[4.0, 4.0, -INF, -INF]]
    # greedy: only the repetition penalty applies (HF applies it as a logits processor, not a warper)
    greedy = process_logits(logits, seen, temperature=0.5, top_k=1, top_p=0.1, repetition_penalty=2.0)
    assert greedy.tolist() == [[2.0, 2.0, -2.0, 1.0]]
    assert torch.equal(process_logits(logits, seen, do_sample=True, top_k=0), logits)  # neutral values: no-ops


def test_text_stream_holds_back_a_possible_stop_string(model):
    tok = model.tokenizer
    ids = tok.encode("Hello there. END of text", add_special_tokens=False)
    stream = TextStream(tok, ["END", "xyz"])
    pieces = []
    for i in ids:
        pieces.append(stream.put(i))
        assert "E" not in "".join(pieces)  # never shown before the stop string is decided
        if stream.stopped:
            break
    assert "".join(pieces) + stream.end() == "Hello there. "


# -- end to end: prompt text -> tokenizer -> model -> the reference's tokens -----------------------------------------

@pytest.mark.parametrize("name", SINGLE)
def test_greedy_chat_gives_the_reference_tokens(model, name):
    conv, case = conversation(name), case_tensors(name)
    steps, eos = gen_steps(name), model.cfg.text.eos_token_id
    batch = build_batch(model, [conv["image"]], [conv["query"]], [conv["history"]], conv["template"])
    assert torch.equal(batch["input_ids"], case["input_ids"]), "prompt tokens differ from the reference"
    assert torch.equal(batch["token_type_ids"], case["token_type_ids"])
    if "pixel_values" in case:
        torch.testing.assert_close(batch["pixel_values"], case["pixel_values"], atol=1e-6, rtol=0)
    expected = until_eos(case["gen_ids"][0].tolist(), eos)
    assert model.generate(**batch, max_new_tokens=steps) == [expected]
    answer = model.chat(**conv, max_new_tokens=steps)
    assert answer == model.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("name", BATCHED)
def test_batch_equals_reference_and_rows_alone(model, name):
    meta, case = MANIFEST["cases"][name], case_tensors(name)
    steps, eos = gen_steps(name), model.cfg.text.eos_token_id
    convs = [conversation(row) for row in meta["rows"]]
    args = ([c["image"] for c in convs], [c["query"] for c in convs], [c["history"] for c in convs],
            [c["template"] for c in convs])
    batch = build_batch(model, *args)
    assert torch.equal(batch["input_ids"], case["input_ids"]), "left-padded batch differs from the reference"
    assert torch.equal(batch["attention_mask"], case["attention_mask"])
    expected = [until_eos(row, eos) for row in case["gen_ids"].tolist()]
    assert model.generate(**batch, max_new_tokens=steps) == expected
    answers = model.chat_batch(*args, max_new_tokens=steps)
    assert answers == [model.chat(**c, max_new_tokens=steps) for c in convs]


def test_rows_finish_independently(model):
    """A mixed batch (image row + text-only row) where one row ends early: each row equals its run alone."""
    convs = [conversation(n) for n in SINGLE[:2]]
    args = ([c["image"] for c in convs], [c["query"] for c in convs], [c["history"] for c in convs],
            [c["template"] for c in convs])
    batch = build_batch(model, *args)
    free = model.generate(**batch, max_new_tokens=6)
    # Pretend one of row 0's tokens that row 1 never produces is eos: row 0 stops there, row 1 runs to the end.
    eos = next(t for t in free[0][1:] if t not in free[1])
    both = model.generate(**batch, max_new_tokens=6, eos_id=eos)
    assert both == [until_eos(free[0], eos), free[1]] and len(both[0]) < len(both[1])
    for row, c in enumerate(convs):
        alone = build_batch(model, [c["image"]], [c["query"]], [c["history"]], c["template"])
        assert both[row] == model.generate(**alone, max_new_tokens=6, eos_id=eos)[0]
    answers = model.chat_batch(*args, max_new_tokens=6, eos_id=eos)
    assert answers == [model.chat(**c, max_new_tokens=6, eos_id=eos) for c in convs]


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    conv = conversation(SINGLE[0])
    batch = build_batch(model, [conv["image"]], [conv["query"]], [conv["history"]], conv["template"])
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0)
    runs = {seed: model.generate(**batch, seed=seed, **kw)[0] for seed in range(4)}
    assert model.generate(**batch, seed=0, **kw)[0] == runs[0]
    assert len({tuple(r) for r in runs.values()}) > 1, "different seeds gave the same samples"
    assert model.chat(**conv, seed=2, **kw) == model.chat(**conv, seed=2, **kw)
    state = torch.get_rng_state()
    model.generate(**batch, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), state), "sampling touched the global RNG"


def test_seeded_sampling_in_a_batch_equals_rows_alone(model):
    convs = [conversation(n) for n in SINGLE[:2]]
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.95, repetition_penalty=1.2, seed=7)
    answers = model.chat_batch([c["image"] for c in convs], [c["query"] for c in convs],
                               [c["history"] for c in convs], [c["template"] for c in convs], **kw)
    assert answers == [model.chat(**c, **kw) for c in convs]


def test_top_k_1_sampling_equals_greedy(model):
    conv = conversation(SINGLE[0])
    batch = build_batch(model, [conv["image"]], [conv["query"]], [conv["history"]], conv["template"])
    greedy = model.generate(**batch, max_new_tokens=8)
    assert model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=1, temperature=3.0, seed=11) == greedy


def test_repetition_penalty_changes_greedy_choice_like_hf(model):
    conv = conversation(SINGLE[0])
    batch = build_batch(model, [conv["image"]], [conv["query"]], [conv["history"]], conv["template"])
    first = model.generate(**batch, max_new_tokens=1)[0][0]
    # HF's processor on the prefill logits, by hand: every prompt id (image placeholders too) is penalised
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["token_type_ids"], pixel_values=batch["pixel_values"]).logits[0, -1]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[batch["input_ids"][0]] = True
    penalised = torch.where(logits < 0, logits * 50.0, logits / 50.0).where(seen, logits)
    assert first == int(logits.argmax())
    assert model.generate(**batch, max_new_tokens=1, repetition_penalty=50.0)[0][0] == int(penalised.argmax())


def test_stop_strings_cut_the_answer_and_end_generation(model, monkeypatch):
    conv = conversation(SINGLE[0])
    full = model.chat(**conv, max_new_tokens=12)
    words = full.split()
    assert len(words) >= 3, f"need a longer greedy answer to test stop strings: {full!r}"
    stop = words[1][-2:] + " " + words[2][:2]  # spans a token boundary (the space starts a new piece)
    expected = full[: full.find(stop)]
    steps = []
    real_step = gen.DecodeSession.step
    monkeypatch.setattr(gen.DecodeSession, "step", lambda self, t: steps.append(1) or real_step(self, t))
    assert model.chat(**conv, max_new_tokens=12, stop=[stop, "never appears \u2603"]) == expected
    assert len(steps) < 11, "generation went on after the stop string"
    pieces = list(model.stream_chat(**conv, max_new_tokens=12, stop=stop))
    assert "".join(pieces) == expected and not any(stop in p for p in pieces)


@pytest.mark.parametrize("name", SINGLE[:2])
def test_stream_chat_pieces_join_to_chat(model, name):
    conv = conversation(name)
    pieces = list(model.stream_chat(**conv, max_new_tokens=10))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == model.chat(**conv, max_new_tokens=10)


def test_session_is_sized_to_the_request_and_reused(model, monkeypatch):
    """The kept KV cache holds the prompt plus max_new_tokens (rounded up to the session step, never past the
    context); a later request that fits reuses it, a longer or wider one replaces it."""
    sizes = []
    real_init = gen.DecodeSession.__init__

    def spy(self, m, batch_size, max_len, *a, **k):
        sizes.append((batch_size, max_len))
        real_init(self, m, batch_size, max_len, *a, **k)

    monkeypatch.setattr(gen.DecodeSession, "__init__", spy)
    model.__dict__.pop(gen.KEPT_SESSION, None)
    limit = model.cfg.text.max_position_embeddings
    step = min(gen.SESSION_LENGTH_STEP, limit)
    ids = torch.tensor([[1, 450, 7483, 310]])
    first = model.generate(ids, max_new_tokens=5)[0]
    assert sizes == [(1, step)] and len(first) == 5
    assert model.generate(ids, max_new_tokens=5)[0] == first and len(sizes) == 1  # reused, same answer
    # default: as many new tokens as fit in max_position_embeddings (stopped at once here by calling its first
    # token eos, to keep the test fast)
    assert model.generate(ids, eos_id=first[0]) == [first[:1]]
    assert sizes[-1] == (1, limit)
    two = model.generate(ids.repeat(2, 1), max_new_tokens=5)
    assert sizes[-1][0] == 2 and two == [first, first]
    fresh = gen.DecodeSession(model, 2, ids.shape[1] + 5)  # an explicit session gives the same tokens
    assert model.generate(ids.repeat(2, 1), max_new_tokens=5, session=fresh) == two
    with pytest.raises(ValueError, match="session holds 2 x 9"):
        model.generate(ids.repeat(3, 1), max_new_tokens=5, session=fresh)


def test_the_next_step_is_queued_before_the_caller_gets_a_token(model):
    """generate_tokens hands each step's tokens to the caller as a CPU tensor after queuing the next decode step,
    so the device decodes while the caller detokenizes; the tokens are those of the plain loop (model.generate)."""
    ids = torch.tensor([[1, 450, 7483, 310]])
    want = model.generate(ids, max_new_tokens=4, eos_id=-1)[0]
    session = gen.DecodeSession(model, 1, ids.shape[1] + 4)
    steps = gen.generate_tokens(model, ids, max_new_tokens=4, eos_id=-1, session=session)
    got = []
    for n, tokens in enumerate(steps):
        assert tokens.device.type == "cpu" and tokens.shape == (1,)
        assert session.length == ids.shape[1] + min(n + 1, 3)  # the step for this token is already queued
        got.append(int(tokens[0]))
    assert got == want


def test_interleaved_generations_on_one_session_fail_loudly(model):
    """Two decode loops cannot share the kept session: the older one stops with a clear error, never reading the
    newer batch's cache."""
    ids = torch.tensor([[1, 450, 7483, 310]])
    older = gen.generate_tokens(model, ids, max_new_tokens=4)
    next(older)
    assert len(model.generate(ids, max_new_tokens=4)[0]) == 4
    with pytest.raises(RuntimeError, match="another generation started"):
        next(older)


def test_repetition_penalty_counts_the_generated_ids_too(model):
    """Each generated id joins the penalised ones: with lm_head biased towards two ids the prompt lacks, a penalty
    that makes a seen id lose to any unseen one must take the first, then the second; and greedy decoding with the
    penalty equals a loop of full forward passes that applies HF's processor to the prompt and every id so far."""
    conv = conversation(SINGLE[0])
    batch = build_batch(model, [conv["image"]], [conv["query"]], [conv["history"]], conv["template"])
    steps, penalty = 4, 1e6
    vocab = model.llm.lm_head.out_features
    first, second = [i for i in range(vocab - 1, 0, -1) if i not in set(batch["input_ids"][0].tolist())][:2]
    bias = torch.zeros(vocab)
    bias[first], bias[second] = 1000.0, 999.0
    hook = model.llm.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    try:
        got = model.generate(**batch, max_new_tokens=steps, repetition_penalty=penalty, eos_id=-1)[0]
        ids, types, want = batch["input_ids"], batch["token_type_ids"], []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(ids, types, pixel_values=batch["pixel_values"]).logits[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[ids[0]] = True
            want.append(int(torch.where(logits < 0, logits * penalty, logits / penalty).where(seen, logits).argmax()))
            ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
            types = torch.cat([types, torch.zeros(1, 1, dtype=types.dtype)], dim=1)
    finally:
        hook.remove()
    assert got[:2] == [first, second] and got == want
