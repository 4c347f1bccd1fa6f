"""`cogvlm ask IMAGE QUESTION`: one answer about one image, streamed to stdout."""
from __future__ import annotations

import argparse
import sys

from .options import (DEVICE_MAP_EXAMPLE, NO_IMAGE, STDIN, STDIN_NAME, generation_kwargs, generation_options,
                      import_model_code, load_model, model_options, text)

EXAMPLES = f"""examples:
  cogvlm ask photo.jpg "Describe this image."
  cogvlm ask photo.jpg "Tell a story about it." --temperature 0.8 --top-p 0.9 --seed 0
  curl -s https://example.com/cat.jpg | cogvlm ask - "What animal is this?"
  cogvlm ask none "The capital of France is" --template base --max-new-tokens 8
  cogvlm ask photo.jpg "What is this?" --model ./cogvlm-chat          # a converted or hub-layout folder
  cogvlm ask photo.jpg "What is this?" --device-map auto --max-memory 0=12GiB,1=12GiB   # over two GPUs
  cogvlm ask photo.jpg "What is this?" --device-map {DEVICE_MAP_EXAMPLE}

IMAGE is a file, "-" for image bytes on stdin, or "none" for a text-only prompt. Photos are turned upright by their
EXIF orientation, as image viewers show them.
Decoding is greedy unless a sampling flag is given (--sample, --temperature, --top-k, --top-p).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ask", parents=[model_options(), generation_options()], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="answer one question about one image (the answer streams to stdout)",
                              description="Answer one question about one image; only the answer goes to stdout.")
    p.add_argument("image", metavar="IMAGE", help='image file, "-" for image bytes on stdin, "none" for text only')
    p.add_argument("question", metavar="QUESTION", type=text,
                   help="the question (or, with --template base, text to continue)")
    return p


def run(args) -> None:
    image = read_image(args.image)
    model = load_model(args)
    write_answer(model.stream_chat(image, args.question, template=args.template, **generation_kwargs(args)))


def read_image(source: str):
    """IMAGE argument -> a decoded PIL image (or None for `none`). Done before the model loads: a typo in a path
    then fails at once, not after minutes of loading."""
    import_model_code()
    from ..image import load_image

    if source == NO_IMAGE:
        return None
    if source == STDIN:
        if sys.stdin.isatty():
            raise ValueError('IMAGE is "-" but stdin is a terminal; pipe the image in: cogvlm ask - "..." < photo.jpg')
        return load_image(sys.stdin.buffer.read(), name=STDIN_NAME)
    return load_image(source)


def write_answer(pieces, one_line: bool = False) -> str:
    """Stream an answer to stdout as it is generated, then a newline; returns it whole. `one_line` writes a line
    break inside the answer as the two characters \\n, so that the output has exactly one line per answer."""
    answer = []
    for piece in pieces:
        sys.stdout.write(piece.replace("\n", "\\n") if one_line else piece)
        sys.stdout.flush()
        answer.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(answer)
