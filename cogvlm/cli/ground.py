"""`cogvlm ground IMAGE [EXPRESSION] --out boxed.png`: where things are, as boxes in the image's pixels."""
from __future__ import annotations

import argparse
import json
import sys

from .options import UsageError, generation_kwargs, generation_options, load_model, log, model_options, text

EXAMPLES = """examples:
  cogvlm ground photo.jpg "the red car" --out boxed.png --model ./cogvlm-grounding-generalist
  cogvlm ground photo.jpg --out boxed.png          # describe the image, with a box for each object it names
  cogvlm ground shapes.png "the blue circle" --model examples/tiny-shapes --out boxed.png

With EXPRESSION the prompt is "Where is EXPRESSION? answer in [[x0,y0,x1,y1]] format.", without it "Can you provide
a description of the image and include the coordinates [[x0,y0,x1,y1]] for each mentioned object?" (the grounding
checkpoints' own prompts; their template is base, which they declare themselves).
stdout: the answer on one line, then one line of JSON: a list of {"phrase", "box": [x0, y0, x1, y1] as the model
wrote it (000-999, relative to the image x 1000), "pixels": the same box in the pixels of IMAGE as given}.
Malformed boxes in the answer are reported on stderr as warnings.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ground", parents=[model_options(), generation_options()], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="find things in an image: boxes in pixels, drawn on the image",
                              description="Ask a grounding model where EXPRESSION is (or for a description with "
                                          "boxes), print the answer and its boxes, and draw them.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("expression", metavar="EXPRESSION", nargs="?", type=text,
                   help='what to find, e.g. "the red car" (default: describe the image with boxes)')
    p.add_argument("--out", metavar="PICTURE", help="write the image with the boxes drawn to PICTURE (.png, .jpg, ...)")
    return p


def run(args) -> None:
    from ..grounding import ground, image_format, save_image
    from ..image import load_image

    if args.out:
        try:
            image_format(args.out)  # a wrong extension fails now, not after the model has loaded
        except ValueError as e:
            raise UsageError(f"--out: {e}") from None
    image = load_image(args.image)
    model = load_model(args)
    result = ground(model, image, args.expression, template=args.template, **generation_kwargs(args))
    record = result.record()
    for problem in record["problems"]:
        print(f"cogvlm ground: warning: malformed box in the answer: {problem}", file=sys.stderr)
    print(result.answer.replace("\n", "\\n"))
    print(json.dumps(record["boxes"]))
    sys.stdout.flush()
    if args.out:
        save_image(result.draw(image), args.out)
        log(args, f"wrote {args.out} ({len(result.boxes)} boxes)")
