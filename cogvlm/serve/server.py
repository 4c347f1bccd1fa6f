"""Run the app with uvicorn: bind, say where, serve until Ctrl-C or SIGTERM, stop the engine."""
from __future__ import annotations

import sys

import uvicorn

from .app import create_app
from .config import ServeConfig
from .engine import Engine


def serve(model, config: ServeConfig, quiet: bool = False) -> None:
    """Serve `model` (loaded, with its tokenizer) until interrupted. The KV cache for `config.max_batch` rows is
    allocated first, so a batch that does not fit in memory fails here, not under load."""
    engine = Engine(model, config.max_batch, config.max_waiting, capacity=config.max_context)
    try:
        uv = uvicorn.Config(create_app(engine, config), host=config.host, port=config.port,
                            log_level="warning" if quiet else "info", access_log=not quiet)
        sock = uv.bind_socket()  # bound here, so that port 0 can be reported as the port it became
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        _Server(uv, f"cogvlm serve: {config.model_name} at {url} (page: {url}/, API: {url}/v1; "
                    f"batch of {config.max_batch}, context {engine.capacity})").run(sockets=[sock])
    finally:
        engine.close()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: str):
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready, file=sys.stderr, flush=True)
