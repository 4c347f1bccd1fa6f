"""`cogvlm serve` under load against `chat_batch` on the same inputs (issue 13's H200 figure).

    python bench/serve_load.py [--preset cogvlm-chat-hf] [--clients 16] [--max-tokens 256] [--json OUT.json]
    python bench/serve_load.py --model examples/tiny-shapes --device cpu --clients 4 --max-tokens 16   # smoke test

Full-size random bf16 weights on the GPU (bench/random_weights.py; the real Llama-2 tokenizer from
examples/tiny-shapes), or a checkpoint with --model. N conversations (a synthetic picture each + a question) are
answered twice, greedy, max_tokens each:
  1. `chat_batch` as one batch of N: end-to-end tokens/s, and the decode rate over its steps (all rows decoding);
  2. the server (the real app and engine, uvicorn in a thread on 127.0.0.1) with --max-batch N and N streaming
     clients started together: end-to-end tokens/s, the steady decode rate (tokens streamed per second while all N
     rows decode: from the last first token to the first finished answer), and time to first token per client.
Both are warmed up first with the same requests (CUDA graph capture, compiled kernels), and the server's cache has
as many slots per row as chat_batch's decode session (`--max-context`), so both attend over the same window. The
target: server decode rate >= 70 % of chat_batch's. Answers equal to chat_batch's are counted too (in bf16 a batch
of other composition may round differently; in fp32 they are equal).

The GPU machine has no FastAPI: carry wheels (see the device notes) of fastapi, starlette, pydantic, pydantic-core,
annotated-types, typing-inspection, uvicorn and opentelemetry-api (FastAPI 0.165 imports it), and put them on
PYTHONPATH.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cogvlm.chat import build_batch  # noqa: E402
from cogvlm.config import CogVLMConfig  # noqa: E402
from cogvlm.generate import generate_tokens, session_length  # noqa: E402
from cogvlm.tokenizer import Tokenizer  # noqa: E402

QUESTIONS = ["Describe this image in detail.", "What is in the picture?", "What colours do you see?",
             "Where could this be?"]


def pictures(n: int, size: int, seed: int = 0) -> list[bytes]:
    """PNG files of smooth gradients with a few flat rectangles (like bench.py's synthetic images)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        a = torch.rand(3, 3, generator=g)
        img = a[:, 0, None, None] * xx + a[:, 1, None, None] * yy + a[:, 2, None, None] * (1 - xx * yy)
        for _ in range(3):
            x0, y0 = torch.randint(0, size * 3 // 4, (2,), generator=g).tolist()
            w, h = torch.randint(size // 8, size // 3, (2,), generator=g).tolist()
            img[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
        pixels = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def load(args):
    if args.model:
        from cogvlm import CogVLM

        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        return CogVLM.from_pretrained(args.model, device=args.device, dtype=dtype)
    from bench.random_weights import random_model

    model = random_model(CogVLMConfig.from_name(args.preset))
    model.tokenizer = Tokenizer(ROOT / "examples" / "tiny-shapes" / "tokenizer.model")
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_chat_batch(model, images, queries, max_tokens: int, device: str) -> dict:
    """chat_batch's path (one left-padded batch, DecodeSession) timed step by step, and its answers."""
    batch = build_batch(model, [Image.open(io.BytesIO(b)) for b in images], queries)
    sync(device)
    start = time.perf_counter()
    steps, first, tokens = 0, None, 0
    done = torch.zeros(len(images), dtype=torch.bool)
    for step_tokens in generate_tokens(model, **batch, max_new_tokens=max_tokens):
        live = ~done
        tokens += int(live.sum())
        done |= (step_tokens == model.cfg.text.eos_token_id).cpu()
        steps += 1
        if first is None:
            sync(device)
            first = time.perf_counter()
    sync(device)
    end = time.perf_counter()
    answers = model.chat_batch([Image.open(io.BytesIO(b)) for b in images], queries, batch_size=len(images),
                               max_new_tokens=max_tokens)
    return {"prompt_tokens": batch["input_ids"].shape[1], "tokens": tokens, "seconds": end - start,
            "ttft_s": first - start, "end_to_end_tok_s": tokens / (end - start),
            "decode_tok_s": (tokens - len(images)) / (end - first), "answers": answers}


def start_server(model, batch: int, context: int):
    import uvicorn

    from cogvlm.serve.app import create_app
    from cogvlm.serve.config import ServeConfig
    from cogvlm.serve.engine import Engine

    engine = Engine(model, max_batch=batch, capacity=context)  # = `cogvlm serve --max-batch B --max-context C`
    config = uvicorn.Config(create_app(engine, ServeConfig(max_batch=batch, max_context=context, port=0)),
                            host="127.0.0.1", port=0, log_level="warning")
    sock = config.bind_socket()
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, engine, sock.getsockname()[1]


def stream_one(port: int, image: bytes, query: str, max_tokens: int, barrier, out: dict) -> None:
    """One streaming client: records when it sent, when each content chunk came, and the usage."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = json.dumps({"model": "m", "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": query}]}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    barrier.wait()
    out["sent"] = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    out["chunks"], pieces = [], []
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            out["tokens"] = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["delta"].get("content"):
            out["chunks"].append(time.perf_counter())
            pieces.append(event["choices"][0]["delta"]["content"])
    out["end"] = time.perf_counter()
    out["answer"] = "".join(pieces)
    conn.close()


def run_server(port: int, images, queries, max_tokens: int) -> dict:
    results = [{} for _ in images]
    barrier = threading.Barrier(len(images))
    threads = [threading.Thread(target=stream_one, args=(port, img, q, max_tokens, barrier, r))
               for img, q, r in zip(images, queries, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["sent"] for r in results)
    end = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["chunks"][0] - r["sent"] for r in results)
    # Steady state: every row decoding, from the last first token to the first last token.
    lo, hi = max(r["chunks"][0] for r in results), min(r["chunks"][-1] for r in results)
    in_window = sum(sum(lo < t <= hi for t in r["chunks"]) for r in results)
    return {"tokens": tokens, "seconds": end - start, "end_to_end_tok_s": tokens / (end - start),
            "decode_tok_s": in_window / (hi - lo) if hi > lo else None,  # None: answers too short to tell
            "ttft_median_s": statistics.median(ttft), "ttft_max_s": ttft[-1], "ttft_min_s": ttft[0],
            "answers": [r["answer"] for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvlm-chat-hf", help="random full-size weights of this preset")
    ap.add_argument("--model", help="a checkpoint instead of random weights (e.g. examples/tiny-shapes)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="with --model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-context", type=int, help="the server's cache slots per row (default: chat_batch's session)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    model = load(args)
    size = model.cfg.vision.image_size
    images = pictures(args.clients, size)
    queries = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.clients)]
    r = {"card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
         "torch": torch.__version__, "model": args.model or args.preset, "clients": args.clients,
         "max_tokens": args.max_tokens, "image_size": size}
    with torch.no_grad():
        # Warm-up at the timed batch and length: the decode session (and its CUDA graph) is made for a batch size,
        # so a smaller warm-up would leave the capture and kernel compilation inside the timed run.
        run_chat_batch(model, images, queries, args.max_tokens, args.device)
        base = run_chat_batch(model, images, queries, args.max_tokens, args.device)
    # The server's cache as long as chat_batch's decode session (its prompt + max_tokens, rounded up as sessions
    # are), so that both attend over the same number of slots per step; --max-context sets another.
    context = args.max_context or session_length(model, base["prompt_tokens"] + args.max_tokens)
    r["max_context"] = context
    server, engine, port = start_server(model, args.clients, context)
    try:
        run_server(port, images, queries, args.max_tokens)  # warm-up: graph capture, compiled kernels
        served = run_server(port, images, queries, args.max_tokens)
        r["engine"] = engine.status()
    finally:
        server.should_exit = True
        engine.close()
    r["answers_equal"] = sum(a == b for a, b in zip(base.pop("answers"), served.pop("answers")))
    r["chat_batch"], r["server"] = base, served
    r["decode_ratio"] = served["decode_tok_s"] and served["decode_tok_s"] / base["decode_tok_s"]
    print(json.dumps(r, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
