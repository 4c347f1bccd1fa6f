"""`cogvlm serve` end to end: the real server (a subprocess on 127.0.0.1, a free port, the shipped tiny model) and
the real `openai` client; answers must equal `model.chat` in this process. The helpers here (the server process,
one server per set of options for the whole session, the reference model) serve the other test_serve* files."""
from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-shapes"
IMAGES = sorted((ROOT / "examples" / "images").glob("*.png"))
KEY = "test-key"
STRICT = ("--api-key", KEY, "--max-batch", "8", "--max-body-mb", "0.5", "--max-image-mb", "0.1",
          "--max-image-pixels", "1000000")
PERMISSIVE = ("--max-batch", "4", "--allow-remote-images")  # and --allow-local-images, see permissive_server


class ServerProcess:
    """`python -m cogvlm.serve` on 127.0.0.1 and a free port; the log goes to a file (a full pipe would block)."""

    def __init__(self, folder: Path, *args: str, timeout: float = 180):
        self.log_path = folder / "server.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "cogvlm.serve", "--model", str(TINY), "--device", "cpu", "--dtype", "fp32",
               "--host", "127.0.0.1", "--port", "0", *args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while (line := self._ready_line()) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.2)
        self.url = line.split(" at ", 1)[1].split()[0]
        self.host, self.port = self.url.removeprefix("http://").rsplit(":", 1)

    def _ready_line(self) -> str | None:
        for line in self.log_path.read_text().splitlines():
            if line.startswith("cogvlm serve: ") and " at http://" in line:
                return line
        return None

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(**{"base_url": self.url + "/v1", "api_key": KEY, "max_retries": 0, "timeout": 120,
                                **kwargs})

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120):
        """(status, parsed JSON or text) over plain http.client, for bodies no client library would send."""
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=timeout)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            conn.request(method, path, data, {"Content-Type": "application/json",
                                              "Authorization": f"Bearer {KEY}", **(headers or {})})
            response = conn.getresponse()
            text = response.read().decode()
            is_json = response.getheader("content-type", "").startswith("application/json")
            return response.status, json.loads(text) if is_json else text
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SERVERS: dict[tuple, ServerProcess] = {}


def shared_server(tmp_path_factory, *args: str) -> ServerProcess:
    """One server per set of options for the whole session, whichever test module asks first (each module's
    session-scoped fixture calls `stop_servers` at the end)."""
    if args not in _SERVERS or _SERVERS[args].proc.poll() is not None:
        _SERVERS[args] = ServerProcess(tmp_path_factory.mktemp("server"), *args)
    return _SERVERS[args]


def stop_servers() -> None:
    while _SERVERS:
        _SERVERS.popitem()[1].stop()


def permissive_server(tmp_path_factory) -> ServerProcess:
    """No API key, remote images on, file:// images from a folder holding one image and a symlink out of it."""
    return shared_server(tmp_path_factory, *PERMISSIVE, "--allow-local-images", str(local_images(tmp_path_factory)))


def local_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "local-images"
    if not folder.exists():
        folder.mkdir()
        shutil.copyfile(IMAGES[0], folder / "inside.png")
        shutil.copyfile(IMAGES[1], folder.parent / "outside.png")
        (folder / "link-out.png").symlink_to(folder.parent / "outside.png")
    return folder


@functools.lru_cache(maxsize=None)
def reference_model():
    from cogvlm import CogVLM

    return CogVLM.from_pretrained(TINY, device="cpu", dtype=torch.float32)


def data_url(path_or_bytes, media: str = "image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def user(text: str, image: str | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    yield shared_server(tmp_path_factory, *STRICT)
    stop_servers()


@pytest.fixture(scope="module")
def model():
    return reference_model()


def test_answers_equal_model_chat(server, model):
    client = server.client()
    for image, question in [(IMAGES[0], "Describe the image."), (IMAGES[1], "What colour is the shape?"),
                            (None, "Hello there")]:
        expected = model.chat(image, question, max_new_tokens=24)
        url = None if image is None else data_url(image)
        answer = client.chat.completions.create(model="tiny-shapes", messages=[user(question, url)], max_tokens=24)
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "stop"
        assert answer.model == "tiny-shapes" and answer.object == "chat.completion"
        prompt = 1 + (model.cfg.num_image_tokens if image else 0)
        assert answer.usage.prompt_tokens > prompt and answer.usage.completion_tokens >= 1

        pieces = list(client.chat.completions.create(model="tiny-shapes", messages=[user(question, url)],
                                                     max_tokens=24, stream=True))
        assert pieces[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in pieces) == expected
        assert [p.choices[0].finish_reason for p in pieces][-1] == "stop"
        assert all(p.choices[0].finish_reason is None for p in pieces[:-1])


def test_two_turn_conversation_equals_chat_with_history(server, model):
    q1, q2 = "Describe the image.", "What colour is the shape?"
    a1 = model.chat(IMAGES[2], q1)
    messages = [{"role": "user", "content": [{"type": "text", "text": q1},
                                             {"type": "image_url", "image_url": {"url": data_url(IMAGES[2])}}]},
                {"role": "assistant", "content": a1}, user(q2)]
    answer = server.client().chat.completions.create(model="m", messages=messages)
    assert answer.choices[0].message.content == model.chat(IMAGES[2], q2, history=[(q1, a1)])


def test_length_stop_strings_and_seeded_sampling(server, model):
    client = server.client()
    short = client.chat.completions.create(model="m", messages=[user("Describe the image.", data_url(IMAGES[0]))],
                                           max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert short.choices[0].message.content == model.chat(IMAGES[0], "Describe the image.", max_new_tokens=2)

    cut = client.chat.completions.create(model="m", messages=[user("Describe the image.", data_url(IMAGES[0]))],
                                         stop=[" triangle"])
    assert cut.choices[0].message.content == model.chat(IMAGES[0], "Describe the image.", stop=[" triangle"])
    assert cut.choices[0].finish_reason == "stop"

    sampling = dict(temperature=1.5, top_p=0.95, seed=7)
    expected = model.chat(None, "Hello", do_sample=True, max_new_tokens=20, **sampling)
    for _ in range(2):
        answer = client.chat.completions.create(model="m", messages=[user("Hello")], max_tokens=20, **sampling)
        assert answer.choices[0].message.content == expected


def test_raw_event_stream_format(server):
    """The wire format itself: only `data:` lines, the role first, a last chunk with finish_reason, usage on
    request, then `data: [DONE]`."""
    status, text = server.request("POST", "/v1/chat/completions", {
        "model": "m", "messages": [user("Hello")], "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_models_health_and_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-shapes"]
    assert server.client().models.retrieve("tiny-shapes").id == "tiny-shapes"
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 8
    status, page = server.request("GET", "/")
    assert status == 200 and "<title>CogVLM</title>" in page and "/static/app.js" in page
    for asset in ("/static/app.js", "/static/style.css"):
        assert server.request("GET", asset)[0] == 200
