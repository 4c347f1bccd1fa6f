"""The OpenAI chat-completions request, checked field by field, and the shapes of answers and errors.

Fields used: messages, max_tokens (or max_completion_tokens), temperature, top_p, stop, seed, stream,
stream_options.include_usage, n (1 only), model (any string; answers carry the served name). Extensions, as vLLM
spells them: top_k, repetition_penalty. Decoding is greedy unless temperature > 0, top_p or top_k is given
(temperature 0 is greedy whatever else is set), the project's default everywhere (`cogvlm ask`, `model.chat`).
OpenAI fields this server cannot honour are refused when they ask for something (logprobs, tools, penalties, ...),
accepted at their neutral values; fields it does not know are ignored, as most OpenAI-compatible servers do.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..conversation import Conversation, ConversationError, from_messages
from ..sampling import check_sampling

MAX_STOP = 4  # OpenAI's limit on stop sequences


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {"message", "type", "param", "code"}}."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    conversation: Conversation
    max_tokens: int | None = None  # None: as many as fit in the context
    sampling: dict = field(default_factory=dict)  # `cogvlm.sampling.process_logits` keywords
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    get = _Fields(body)
    get.string("model")
    get.string("user")
    try:
        conversation = from_messages(body.get("messages"))
    except ConversationError as e:
        raise APIError(400, str(e), e.param) from None
    n = get.integer("n", 1, 1 << 31)
    if n not in (None, 1):
        raise APIError(400, f"n={n} is not supported: this server returns one choice per request", "n")
    max_tokens = get.integer("max_completion_tokens", 1, 1 << 31)
    if max_tokens is None:
        max_tokens = get.integer("max_tokens", 1, 1 << 31)
    temperature = get.number("temperature", 0, 2)
    top_p = get.number("top_p", 0, 1)
    top_k = get.integer("top_k", 0, 1 << 31)
    penalty = get.number("repetition_penalty", 0, float("inf"))
    sample = temperature != 0 and any(v is not None for v in (temperature, top_p, top_k))
    sampling = {"do_sample": sample, "temperature": temperature if sample and temperature else 1.0,
                "top_k": 50 if top_k is None else top_k, "top_p": 1.0 if top_p is None else top_p,
                "repetition_penalty": 1.0 if penalty is None else penalty}
    try:
        check_sampling(sampling["temperature"], sampling["top_k"], sampling["top_p"], sampling["repetition_penalty"])
    except ValueError as e:
        raise APIError(400, str(e)) from None
    stream = get.boolean("stream") or False
    options = get.object("stream_options") or {}
    include_usage = _Fields(options, "stream_options.").boolean("include_usage") or False
    _refuse_unsupported(get)
    return ChatRequest(conversation, max_tokens, sampling, get.integer("seed", -(1 << 63), (1 << 63) - 1),
                       _stop(body.get("stop")), stream, include_usage)


def _refuse_unsupported(get: "_Fields") -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if get.number(name, -2, 2):
            raise APIError(400, f"{name} is not supported; use repetition_penalty (Hugging Face's) instead", name)
    if get.boolean("logprobs") or get.integer("top_logprobs", 0, 20) is not None:
        raise APIError(400, "logprobs are not supported by this server", "logprobs")
    if get.object("logit_bias"):
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    for name in ("tools", "functions"):
        if get.list(name):
            raise APIError(400, f"{name} (function calling) are not supported by CogVLM", name)
    fmt = get.object("response_format")
    if fmt and fmt.get("type") != "text":
        raise APIError(400, "response_format other than text is not supported", "response_format")


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' holds {len(stops)} strings; at most {MAX_STOP} are allowed", "stop")
    return stops


class _Fields:
    """Typed reads of optional fields; null means absent; a value of the wrong type or range is a 400."""

    def __init__(self, body: dict, prefix: str = ""):
        self.body, self.prefix = body, prefix

    def _get(self, name: str, types: tuple, what: str):
        value = self.body.get(name)
        # JSON true/false are not numbers, although Python's bool is an int.
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise APIError(400, f"'{self.prefix}{name}' must be {what}, got {_json_kind(value)}", self.prefix + name)
        return value

    def _range(self, name: str, value, low, high):
        if value is not None and not low <= value <= high:
            raise APIError(400, f"'{self.prefix}{name}' must be in [{low}, {high}], got {value}", self.prefix + name)
        return value

    def integer(self, name, low, high):
        return self._range(name, self._get(name, (int,), "an integer"), low, high)

    def number(self, name, low, high):
        return self._range(name, self._get(name, (int, float), "a number"), low, high)

    def boolean(self, name):
        return self._get(name, (bool,), "a boolean")

    def string(self, name):
        return self._get(name, (str,), "a string")

    def object(self, name):
        return self._get(name, (dict,), "an object")

    def list(self, name):
        return self._get(name, (list,), "a list")


def _json_kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# -- answers --------------------------------------------------------------------------------------------------------


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(id_: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(id_: str, model: str, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
