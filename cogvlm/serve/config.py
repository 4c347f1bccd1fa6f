"""The server's settings and their command-line options (no torch here: `cogvlm --help` stays light)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

MiB = 2**20


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the model is the operator's explicit choice
    port: int = 8000  # 0 picks a free port (the ready line says which)
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer <key>`
    model_name: str = "cogvlm"  # the id /v1/models lists and responses carry
    template: str | None = None  # prompt template; None: the checkpoint's template_version
    max_batch: int = 8  # rows decoded together; more requests wait for a free row
    max_waiting: int = 256  # requests waiting for a row; past it a request is refused (429)
    max_context: int | None = None  # prompt + max_tokens limit per request, the cache's room per row (None: the
    #                                 model's max_position_embeddings); lower it to fit a larger batch in memory
    max_body_bytes: int = 32 * MiB  # a request body past it is refused (413) before it is parsed
    max_image_bytes: int = 20 * MiB  # an image file past it is refused (400), decoded or fetched
    max_image_pixels: int = 64_000_000  # width x height past it is refused (400) before decoding: bombs
    allow_remote_images: bool = False  # fetch http(s):// image URLs
    local_images_dir: str | None = None  # serve file:// image URLs from under this folder only
    remote_timeout: float = 10.0  # seconds for fetching one remote image

    def __post_init__(self):
        for name, option in (("max_batch", "--max-batch"), ("max_waiting", "--max-waiting"),
                             ("max_context", "--max-context"), ("max_body_bytes", "--max-body-mb"),
                             ("max_image_bytes", "--max-image-mb"), ("max_image_pixels", "--max-image-pixels")):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{option} must be positive ({name} = {getattr(self, name)})")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.local_images_dir is not None:
            if not os.path.isdir(self.local_images_dir):
                raise ValueError(f"--allow-local-images {self.local_images_dir}: not a folder")
            self.local_images_dir = os.path.realpath(self.local_images_dir)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The serve options; the model options and --template come from `cogvlm.cli.options`."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    g.add_argument("--api-key", metavar="KEY", default=os.environ.get("COGVLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 requests (default: $COGVLM_API_KEY, else none)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="model id shown by /v1/models and in responses (default: the --model id, or a folder's name)")
    g.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together (default 8); the KV cache for N full contexts is allocated "
                        "at start")
    g.add_argument("--max-context", type=int, metavar="N",
                   help="prompt + answer tokens per request, the KV cache's room per row (default: the model's "
                        "context, max_position_embeddings)")
    g.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="requests queued for a free batch row before new ones get 429 (default 256)")
    g = parser.add_argument_group("limits and images")
    g.add_argument("--max-body-mb", type=float, default=32, metavar="MB", help="request body limit (default 32)")
    g.add_argument("--max-image-mb", type=float, default=20, metavar="MB", help="image file limit (default 20)")
    g.add_argument("--max-image-pixels", type=int, default=64_000_000, metavar="N",
                   help="width x height limit, checked before decoding (default 64000000)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http:// and https:// image URLs (default: only data: URLs)")
    g.add_argument("--allow-local-images", metavar="DIR",
                   help="accept file:// image URLs of files under DIR (default: refused)")


def from_args(args: argparse.Namespace) -> ServeConfig:
    # A folder is named by its last part; a hub id ("THUDM/cogvlm-chat-hf") as it is.
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model)
                                      else args.model)
    return ServeConfig(
        host=args.host, port=args.port, api_key=args.api_key or None, model_name=name, template=args.template,
        max_batch=args.max_batch, max_waiting=args.max_waiting, max_context=args.max_context,
        max_body_bytes=int(args.max_body_mb * MiB), max_image_bytes=int(args.max_image_mb * MiB),
        max_image_pixels=args.max_image_pixels, allow_remote_images=args.allow_remote_images,
        local_images_dir=args.allow_local_images,
    )
