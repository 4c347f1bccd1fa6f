"""The HTTP side: OpenAI's /v1/chat/completions and /v1/models, /health, and the chat page at /.

A request is read within the body limit, checked (`protocol`), its image fetched and decoded and its prompt
tokenized in a worker thread (`prepare`), then handed to the engine, whose thread sends back text pieces through
the event loop. Every failure the client can cause is a 4xx with OpenAI's error body; a client that goes away
(mid-stream or while waiting) cancels its request, which frees its batch row at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..image import preprocess
from ..prompt import build_inputs
from .config import ServeConfig
from .engine import Busy, Engine, Job
from .images import fetch_image
from .protocol import APIError, ChatRequest, chunk, completion, new_id, parse_chat_request, usage

STATIC = Path(__file__).parent / "static"


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="cogvlm", docs_url=None, redoc_url=None, openapi_url=None)  # no CDN-hosted docs pages
    model, started = engine.model, int(time.time())
    template = config.template or model.cfg.template_version

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # a bug: answered as OpenAI does, logged by uvicorn
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown paths (404), wrong methods (405)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", None,
                           "invalid_api_key")

    @app.get("/health")
    async def health():
        alive = engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": config.model_name,
                             **engine.status()}, status_code=200 if alive else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def one_model(name: str):
        if name != config.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {config.model_name!r}",
                           "model", "model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": started, "owned_by": "cogvlm",
                "max_model_len": engine.capacity}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        chat = parse_chat_request(await read_json(request, config.max_body_bytes))
        inputs = await run_in_threadpool(prepare, chat)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:  # called in the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is stopping
                pass

        job = Job(**inputs, emit=emit, sampling=chat.sampling, seed=chat.seed, stop=chat.stop)
        try:
            engine.submit(job)
        except Busy as e:
            raise APIError(429, str(e), None, "server_busy") from None
        if chat.stream:
            return StreamingResponse(stream(job, events, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            pieces, end = [], None
            while end is None:
                event = await events.get()
                if event[0] == "text":
                    pieces.append(event[1])
                else:
                    end = event
        finally:
            watcher.cancel()
            job.cancel()  # no-op once the job has ended
        if end[0] == "cancelled":  # nobody is listening any more
            raise APIError(400, "the request was cancelled: its client went away", None, "cancelled")
        if end[0] == "error":
            raise APIError(500, end[1])
        return completion(new_id(), config.model_name, "".join(pieces), *end[1:])

    def prepare(chat: ChatRequest) -> dict:
        """Prompt ids and pixels for the engine (a worker thread: decoding an image takes a while). The prompt's
        length is checked first, before any image work."""
        conv = chat.conversation
        n_image = model.cfg.num_image_tokens if conv.image is not None else 0
        limit = engine.capacity
        try:
            ids = build_inputs(engine.tokenizer, conv.query, conv.history, template, n_image, max_length=limit)
        except ValueError as e:
            raise APIError(400, f"{e} (the context is {limit} tokens)", "messages", "context_length_exceeded") \
                from None
        length = ids["input_ids"].shape[0]
        room = limit - length
        if room < 1 or (chat.max_tokens or 0) > room:
            asked = f"max_tokens={chat.max_tokens}" if chat.max_tokens else "an answer"
            raise APIError(400, f"the prompt is {length} tokens (an image takes {model.cfg.num_image_tokens}) and "
                                f"{asked} does not fit in the context of {limit} tokens"
                                + (f"; ask for at most {room}" if room > 0 else "; shorten the conversation"),
                           "max_tokens" if room > 0 else "messages", "context_length_exceeded")
        pixels = None
        if conv.image is not None:
            pixels = preprocess(fetch_image(conv.image, conv.image_param, config), model.cfg.vision.image_size)
        return {"input_ids": ids["input_ids"], "token_type_ids": ids["token_type_ids"], "pixel_values": pixels,
                "max_new_tokens": chat.max_tokens or room}

    async def stream(job: Job, events: asyncio.Queue, include_usage: bool):
        """OpenAI's event stream: the role, content deltas, a last chunk with finish_reason, [DONE]."""
        id_, created = new_id(), int(time.time())
        try:
            yield sse(chunk(id_, config.model_name, created, {"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield sse(chunk(id_, config.model_name, created, {"content": event[1]}))
                    continue
                if event[0] == "error":
                    yield sse(APIError(500, event[1]).body())
                elif event[0] == "cancelled":
                    return
                else:
                    reason, prompt_tokens, completion_tokens = event[1:]
                    yield sse(chunk(id_, config.model_name, created, {}, reason))
                    if include_usage:
                        yield sse({**chunk(id_, config.model_name, created, {}), "choices": [],
                                   "usage": usage(prompt_tokens, completion_tokens)})
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (the response is cancelled) or the answer is complete

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def read_json(request: Request, limit: int):
    """The body as JSON, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise APIError(400, f"bad Content-Length header {declared!r}")
    if declared is not None and int(declared) > limit:
        raise APIError(413, f"the request body is over this server's limit of {limit} bytes", None,
                       "request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes", None,
                           "request_too_large")
    try:
        return json.loads(body, parse_constant=_not_json)
    except ValueError as e:  # JSONDecodeError and bad UTF-8 alike
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Waits for the client to go away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
