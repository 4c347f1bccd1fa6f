"""`cogvlm serve`: an OpenAI-compatible HTTP server for the model, with continuous batching and a chat page.

Needs the `serve` extra (FastAPI, uvicorn): `pip install -e ".[serve]"`. See docs/serve.md.
"""
from __future__ import annotations

import argparse

EXAMPLES = """examples:
  cogvlm serve --model examples/tiny-shapes                 # then open http://127.0.0.1:8000/
  cogvlm serve --port 8080 --api-key "$KEY" --max-batch 16
  cogvlm serve --allow-local-images ./photos --max-context 1536
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "cogvlm", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'

The server binds 127.0.0.1 unless --host says otherwise. Images come as data:image/...;base64 URLs; http(s)://
and file:// image URLs only with --allow-remote-images / --allow-local-images DIR. Decoding is greedy unless a
request sets temperature > 0, top_p or top_k.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..serve.config import add_options
    from .options import TEMPLATE_CHOICES, model_options

    p = subparsers.add_parser(
        "serve", parents=[model_options()], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        help="serve the model over HTTP: OpenAI's /v1/chat/completions and a chat page",
        description="Serve the model over HTTP: OpenAI's /v1/chat/completions (streaming too), /v1/models, "
                    "/health and a chat page at /. Concurrent requests share the decode batch.")
    add_options(p)
    p.add_argument("--template", choices=TEMPLATE_CHOICES,
                   help="prompt template of every request (default: the checkpoint's template_version)")
    return p


def run(args) -> None:
    from ..serve.config import from_args
    from .options import UsageError, load_model

    try:
        config = from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"cogvlm serve needs the serve extra ({e.name} is missing): pip install 'cogvlm[serve]'") \
            from None
    args.batch_size = config.max_batch  # a planned --device-map then reserves the engine's KV cache
    model = load_model(args)  # before binding: the URL is printed only once requests can be answered
    from ..serve.server import serve

    serve(model, config, quiet=getattr(args, "quiet", False))
