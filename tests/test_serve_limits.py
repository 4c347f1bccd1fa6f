"""`cogvlm serve` at its limits: every bad request gets its 4xx and OpenAI's error body and the next good request
is answered; oversized bodies; clients that go away; remote and local image URLs only where the operator allows
them. The real server on 127.0.0.1 (see test_serve.py)."""
from __future__ import annotations

import functools
import http.client
import http.server
import io
import json
import os
import socket
import threading
import time

import openai
import pytest
from PIL import Image

from .test_serve import (IMAGES, KEY, STRICT, data_url, local_images, permissive_server, reference_model,
                         shared_server, stop_servers, user)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    yield shared_server(tmp_path_factory, *STRICT)
    stop_servers()


@pytest.fixture(scope="session")
def permissive(tmp_path_factory):
    yield permissive_server(tmp_path_factory)
    stop_servers()


@pytest.fixture(scope="module")
def model():
    return reference_model()


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


def bad_requests(tiny_context: int):
    """(what, body or raw bytes, extra headers, status, error param or code) for every kind of bad request."""
    ok_image = data_url(IMAGES[0])
    long_text = "word " * (tiny_context + 10)
    base = {"model": "m", "messages": [user("Hello")]}
    return [
        ("invalid JSON", b"{not json", {}, 400, None),
        ("body not an object", [1, 2], {}, 400, None),
        ("no messages", {"model": "m"}, {}, 400, "messages"),
        ("messages not a list", {**base, "messages": "hi"}, {}, 400, "messages"),
        ("content of a wrong type", {**base, "messages": [{"role": "user", "content": 5}]}, {}, 400,
         "messages[0].content"),
        ("unknown role", {**base, "messages": [{"role": "robot", "content": "x"}]}, {}, 400, "messages[0].role"),
        ("ends with the assistant", {**base, "messages": [user("q"), {"role": "assistant", "content": "a"}]},
         {}, 400, "messages[1]"),
        ("temperature a string", {**base, "temperature": "hot"}, {}, 400, "temperature"),
        ("temperature out of range", {**base, "temperature": 5}, {}, 400, "temperature"),
        ("max_tokens a string", {**base, "max_tokens": "10"}, {}, 400, "max_tokens"),
        ("max_tokens a boolean", {**base, "max_tokens": True}, {}, 400, "max_tokens"),
        ("stream a string", {**base, "stream": "yes"}, {}, 400, "stream"),
        ("stop a number", {**base, "stop": 3}, {}, 400, "stop"),
        ("seed a float", {**base, "seed": 1.5}, {}, 400, "seed"),
        ("n = 2", {**base, "n": 2}, {}, 400, "n"),
        ("logprobs", {**base, "logprobs": True}, {}, 400, "logprobs"),
        ("prompt past the context", {**base, "messages": [user(long_text)]}, {}, 400, "context_length_exceeded"),
        ("max_tokens past the context", {**base, "max_tokens": tiny_context}, {}, 400, "context_length_exceeded"),
        ("second image", {**base, "messages": [user("a", ok_image), {"role": "assistant", "content": "b"},
                                               user("c", ok_image)]}, {}, 400, "messages[2].content[0].image_url.url"),
        ("image in an assistant turn", {**base, "messages": [
            user("a"), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": ok_image}}]},
            user("c")]}, {}, 400, "messages[1].content[0]"),
        ("bad base64", {**base, "messages": [user("q", "data:image/png;base64,@@@not base64@@@")]}, {}, 400,
         "invalid_base64"),
        ("not an image", {**base, "messages": [user("q", data_url(b"just some text, not pixels"))]}, {}, 400,
         "invalid_image"),
        ("not an image media type", {**base, "messages": [user("q", data_url(png((8, 8)), "text/plain"))]}, {},
         400, "invalid_image_url"),
        ("truncated image", {**base, "messages": [user("q", data_url(IMAGES[0].read_bytes()[:120]))]}, {}, 400,
         "invalid_image"),
        ("image bytes past the limit", {**base, "messages": [user("q", data_url(os.urandom(120_000)))]}, {}, 400,
         "image_too_large"),
        ("pixel bomb", {**base, "messages": [user("q", data_url(png((4000, 4000))))]}, {}, 400, "image_too_large"),
        ("remote image not enabled", {**base, "messages": [user("q", "http://127.0.0.1:9/cat.png")]}, {}, 400,
         "image_url_not_allowed"),
        ("local image not enabled", {**base, "messages": [user("q", f"file://{IMAGES[0]}")]}, {}, 400,
         "image_url_not_allowed"),
        ("no API key", base, {"Authorization": ""}, 401, "invalid_api_key"),
        ("wrong API key", base, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ]


def test_every_bad_request_is_a_4xx_and_the_next_good_one_is_answered(server, model):
    expected = model.chat(None, "Hello", max_new_tokens=3)
    good = {"model": "m", "messages": [user("Hello")], "max_tokens": 3}
    for what, body, headers, status, where in bad_requests(model.cfg.text.max_position_embeddings):
        got, error = server.request("POST", "/v1/chat/completions", body, headers)
        assert got == status, f"{what}: {got} {error}"
        assert set(error["error"]) == {"message", "type", "param", "code"}, what
        assert where in (None, error["error"]["param"], error["error"]["code"]), f"{what}: {error}"
        assert error["error"]["message"], what
        got, answer = server.request("POST", "/v1/chat/completions", good)
        assert got == 200 and answer["choices"][0]["message"]["content"] == expected, f"after {what}: {answer}"
    for declared in (True, False):
        status, error = post_oversized_body(server, 2**19, declared)  # STRICT's --max-body-mb 0.5
        assert status == 413 and error["error"]["code"] == "request_too_large", error
        got, answer = server.request("POST", "/v1/chat/completions", good)
        assert got == 200 and answer["choices"][0]["message"]["content"] == expected
    assert server.request("GET", "/v1/nothing-here")[0] == 404
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.health()["status"] == "ok"


def post_oversized_body(server, limit: int, declared: bool) -> tuple[int, dict]:
    """A body over the limit: declared by Content-Length (only its first byte is sent: the server must answer from
    the header) or sent chunked, with no length, so that the server has to count (the last chunk passes the limit,
    so nothing is left unread that could turn the server's close into a reset). Raw socket, so the client sends
    exactly what it says."""
    with socket.create_connection((server.host, int(server.port)), timeout=60) as sock:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nConnection: close\r\n")
        if declared:
            sock.sendall(f"{head}Content-Length: {limit + 1}\r\n\r\n{{".encode())
        else:
            sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            part = b" " * 65536
            for _ in range(limit // len(part) + 1):
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))  # no end: the server must stop reading
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    return conn, conn.getresponse()


def wait_for(server, condition, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(health := server.health()):
        assert time.monotonic() < deadline, f"server state never changed: {health}"
        time.sleep(0.1)
    return health


def test_client_disconnecting_frees_its_row(server, model):
    # A long answer to walk away from: a repetition penalty below 1 favours the tokens already seen, so the model
    # repeats them rather than ending (sampling at temperature 2 ended after 2-87 tokens, often before the client
    # had left: a flaky test).
    long = {"model": "m", "messages": [user("Hello")], "max_tokens": 400, "repetition_penalty": 0.01}
    before = wait_for(server, lambda h: h["active"] == 0)
    conn, response = open_stream(server, {**long, "stream": True})
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the role chunk: the request is being answered
    conn.sock.shutdown(2)  # the client goes away mid-stream
    conn.close()
    after = wait_for(server, lambda h: h["cancelled"] > before["cancelled"] and h["active"] == 0)
    assert after["completed"] == before["completed"]

    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(long).encode(),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    wait_for(server, lambda h: h["active"] == 1)
    conn.close()  # a non-streaming client that gives up waiting
    after = wait_for(server, lambda h: h["cancelled"] > before["cancelled"] + 1 and h["active"] == 0)
    assert after["completed"] == before["completed"]

    answer = server.client().chat.completions.create(model="m", messages=[user("Hello")], max_tokens=3)
    assert answer.choices[0].message.content == model.chat(None, "Hello", max_new_tokens=3)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_and_local_image_urls_where_the_operator_allows_them(permissive, tmp_path_factory, model):
    """--allow-remote-images fetches http:// URLs (here from a server on 127.0.0.1); --allow-local-images DIR reads
    file:// URLs inside DIR only: not a file elsewhere, not through `..`, not through a symlink pointing out."""
    folder = local_images(tmp_path_factory)
    images = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(IMAGES[0].parent)))
    threading.Thread(target=images.serve_forever, daemon=True).start()
    client = permissive.client()
    question = "Describe the image."
    try:
        remote = f"http://127.0.0.1:{images.server_address[1]}/{IMAGES[2].name}"
        answer = client.chat.completions.create(model="m", messages=[user(question, remote)])
        assert answer.choices[0].message.content == model.chat(IMAGES[2], question)
        missing = permissive.request("POST", "/v1/chat/completions", {"messages": [user(question, remote + "x")]})
        assert missing[0] == 400 and missing[1]["error"]["code"] == "image_fetch_failed"
    finally:
        images.shutdown()
        images.server_close()
    answer = client.chat.completions.create(model="m", messages=[user(question, f"file://{folder}/inside.png")])
    assert answer.choices[0].message.content == model.chat(IMAGES[0], question)
    for url in (f"file://{IMAGES[1]}", f"file://{folder}/../outside.png", f"file://{folder}/link-out.png"):
        status, error = permissive.request("POST", "/v1/chat/completions", {"messages": [user(question, url)]})
        assert status == 400 and error["error"]["code"] == "image_url_not_allowed", (url, error)
    status, error = permissive.request("POST", "/v1/chat/completions",
                                       {"messages": [user(question, f"file://{folder}/absent.png")]})
    assert status == 400 and error["error"]["code"] == "invalid_image", error
