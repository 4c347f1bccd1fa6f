"""Load: 32 concurrent clients x 4 requests each (streaming and not, image and text only, greedy and seeded
sampling) against one server with a batch of 8; every answer complete and equal to `model.chat` on that request
alone, none lost, the rows shared the decode steps, and the server is healthy and idle after. Bounded in time."""
from __future__ import annotations

import threading
import time

import pytest

from .test_serve import IMAGES, STRICT, data_url, reference_model, shared_server, stop_servers, user

CLIENTS, REQUESTS_EACH, DEADLINE_S = 32, 4, 240
GREEDY, SAMPLED = {}, {"temperature": 2.0, "top_k": 0, "seed": 5}  # sampled at a high temperature: long answers
CASES = [(image, question, None, GREEDY) for image in IMAGES
         for question in ("Describe the image.", "What shape is it?")]
CASES += [(None, question, 16, GREEDY) for question in ("Hello there", "What is red?", "Tell me a story", "a b c")]
CASES += [(IMAGES[1], "Describe the image.", 24, SAMPLED), (None, "Hello", 32, SAMPLED)]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    yield shared_server(tmp_path_factory, *STRICT)
    stop_servers()


def test_32_clients_x_4_requests_all_equal_single_requests(server):
    model = reference_model()
    expected = [model.chat(image, question, max_new_tokens=max_tokens, do_sample=bool(sampling), **sampling)
                for image, question, max_tokens, sampling in CASES]
    before = server.health()
    results: dict[tuple[int, int], tuple[int, str, int]] = {}
    failures: list[str] = []

    def client_loop(c: int) -> None:
        client = server.client(timeout=DEADLINE_S)
        for r in range(REQUESTS_EACH):
            case = (c * REQUESTS_EACH + r) % len(CASES)
            image, question, max_tokens, sampling = CASES[case]
            extra = {"top_k": sampling["top_k"]} if "top_k" in sampling else None  # not an OpenAI field
            request = dict(model="m", messages=[user(question, None if image is None else data_url(image))],
                           max_tokens=max_tokens, extra_body=extra,
                           **{k: v for k, v in sampling.items() if k != "top_k"})
            try:
                if (c + r) % 2:  # half of them stream
                    pieces = list(client.chat.completions.create(**request, stream=True,
                                                                 stream_options={"include_usage": True}))
                    text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
                    assert pieces[-2].choices[0].finish_reason in ("stop", "length")
                    tokens = pieces[-1].usage.completion_tokens
                else:
                    answer = client.chat.completions.create(**request)
                    text, tokens = answer.choices[0].message.content, answer.usage.completion_tokens
                results[c, r] = (case, text, tokens)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                failures.append(f"client {c} request {r}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(CLIENTS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, DEADLINE_S - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads), f"clients still waiting after {DEADLINE_S}s"
    assert not failures, failures[:5]
    assert len(results) == CLIENTS * REQUESTS_EACH, "requests were lost"
    wrong = [(key, CASES[case][:3], text, expected[case]) for key, (case, text, _) in results.items()
             if text != expected[case]]
    assert not wrong, wrong[:5]

    after = server.health()
    assert after["status"] == "ok" and after["active"] == 0 and after["waiting"] == 0
    assert after["completed"] - before["completed"] == CLIENTS * REQUESTS_EACH
    steps = after["steps"] - before["steps"]
    tokens = sum(t for _, _, t in results.values())
    # A request takes one step per token after its first, so alone they would need `tokens - requests` steps.
    assert steps < (tokens - len(results)) / 2, f"{steps} steps for {tokens} tokens: the batch was not shared"
    print(f"\n{len(results)} requests, {tokens} tokens in {elapsed:.1f}s, {steps} decode steps")
