"""The serve pieces on their own, in process: the continuous-batching engine against `model.chat` (rows joining
mid-decode, moving right to make room, compaction at the end of the cache, cancellation, the waiting bound), the
messages -> conversation rules and the request's sampling settings."""
from __future__ import annotations

import queue

import pytest

from cogvlm.conversation import ConversationError, from_messages
from cogvlm.image import preprocess
from cogvlm.prompt import build_inputs
from cogvlm.serve.engine import Busy, Engine, Job
from cogvlm.serve.protocol import APIError, parse_chat_request

from .test_serve import IMAGES, reference_model

GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def model():
    return reference_model()


class Request:
    """A job and what the engine sent back for it."""

    def __init__(self, model, query, image=None, template="chat", max_new_tokens=20, on_event=None, **sampling):
        inputs = build_inputs(model.tokenizer, query, None, template, model.cfg.num_image_tokens if image else 0)
        pixels = None if image is None else preprocess(image, model.cfg.vision.image_size)
        self.events: queue.Queue = queue.Queue()
        self.length = inputs["input_ids"].shape[0]
        seed = sampling.pop("seed", None)

        def emit(event):
            self.events.put(event)
            if on_event:
                on_event(event)

        self.job = Job(inputs["input_ids"], inputs["token_type_ids"], pixels, max_new_tokens, emit,
                       sampling={**GREEDY, **sampling}, seed=seed)

    def result(self, timeout: float = 120) -> tuple[str, tuple]:
        pieces = []
        while (event := self.events.get(timeout=timeout))[0] == "text":
            pieces.append(event[1])
        return "".join(pieces), event


def test_rows_joining_moving_and_compacting_still_equal_chat(model):
    """Capacity 100: A (a long greedy answer) starts alone; after its 20th piece B (an image prompt longer than
    the slots used so far, so every row moves right) and C (seeded sampling) join; the shared slot then reaches
    the end of the cache while A is still decoding, and the rows are moved left. Each answer equals chat alone."""
    engine = Engine(model, max_batch=3, capacity=100)
    sampled = dict(do_sample=True, temperature=2.0, top_k=0, seed=3)
    joined = {}

    def after_a_piece(event):
        joined["pieces"] = joined.get("pieces", 0) + 1
        if joined["pieces"] == 20:
            joined["cur"] = engine.cur
            for request in (b, c):
                engine.submit(request.job)

    a = Request(model, "a b c d e f g", template="base", max_new_tokens=85, on_event=after_a_piece)
    b = Request(model, "What is it?", IMAGES[2], max_new_tokens=20)
    c = Request(model, "Hello", max_new_tokens=20, **sampled)
    try:
        engine.submit(a.job)
        answers = [r.result() for r in (a, b, c)]
    finally:
        engine.close()
    assert joined["cur"] < b.length, "B should have joined with a prompt longer than the slots in use"
    assert engine.counts["compactions"] >= 1 and engine.counts["completed"] == 3
    assert answers[0] == (model.chat(None, "a b c d e f g", template="base", max_new_tokens=85),
                          ("done", "length", a.length, 85))
    assert answers[1][0] == model.chat(IMAGES[2], "What is it?", max_new_tokens=20)
    assert answers[2][0] == model.chat(None, "Hello", max_new_tokens=20, **sampled)
    assert engine.counts["steps"] < 85 + answers[1][1][3] + answers[2][1][3], "the rows did not share steps"


def test_cancelled_rows_leave_and_waiting_is_bounded(model):
    engine = Engine(model, max_batch=1, max_waiting=1)
    try:
        first = Request(model, "a b c", template="base", max_new_tokens=80)
        second = Request(model, "red red", template="base", max_new_tokens=80)
        with engine.lock:  # the engine cannot admit anything meanwhile: both stay waiting
            engine.submit(first.job)
            with pytest.raises(Busy, match="already waiting"):
                engine.submit(second.job)
        assert first.events.get(timeout=60)[0] == "text"
        engine.submit(second.job)  # waits: the only row is taken
        second.job.cancel()
        first.job.cancel()
        assert first.result()[1] == ("cancelled",) and second.result()[1] == ("cancelled",)
        assert engine.status()["cancelled"] == 2 and engine.status()["active"] == 0

        third = Request(model, "Describe the image.", IMAGES[0])  # the freed row serves the next request
        engine.submit(third.job)
        assert third.result()[0] == model.chat(IMAGES[0], "Describe the image.", max_new_tokens=20)
    finally:
        engine.close()


def test_messages_become_image_history_and_query():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    conv = from_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image]},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": "Colour?"},
    ])
    assert conv.image == "data:image/png;base64,AAAA" and conv.image_param == "messages[1].content[0].image_url.url"
    assert conv.history == [("Be brief.\nWhat is it?", "A square.")] and conv.query == "Colour?"
    assert from_messages([{"role": "user", "content": "hi"}]).image is None

    bad = [
        ([], "messages"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "messages"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
         "messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [image, image]}], "messages[0].content[1].image_url.url"),
        ([{"role": "system", "content": [image]}, {"role": "user", "content": "q"}], "messages[0].content[0]"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ]
    for messages, param in bad:
        with pytest.raises(ConversationError) as e:
            from_messages(messages)
        assert e.value.param == param, messages


def test_greedy_unless_a_sampling_field_asks_otherwise():
    def sampling(**fields):
        return parse_chat_request({"messages": [{"role": "user", "content": "q"}], **fields}).sampling

    assert sampling()["do_sample"] is False
    assert sampling(temperature=0, top_p=0.5)["do_sample"] is False  # temperature 0 is greedy, as OpenAI's
    assert sampling(top_p=0.9) == {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.9,
                                   "repetition_penalty": 1.0}
    assert sampling(temperature=0.7, top_k=0)["temperature"] == 0.7
    assert sampling(repetition_penalty=1.2) == {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                                "repetition_penalty": 1.2}
    with pytest.raises(APIError) as e:
        sampling(repetition_penalty=0)
    assert e.value.status == 400
    request = parse_chat_request({"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 5,
                                  "stop": "\n", "stream": True, "stream_options": {"include_usage": True}})
    assert (request.max_tokens, request.stop, request.stream, request.include_usage) == (5, ["\n"], True, True)
