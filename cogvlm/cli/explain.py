"""`cogvlm explain IMAGE QUESTION --out heat.png`: where in the image the answer looked (decoder attention)."""
from __future__ import annotations

import argparse
import json
import sys

from .options import UsageError, generation_kwargs, generation_options, load_model, log, model_options, text

EXAMPLES = """examples:
  cogvlm explain photo.jpg "What is on the table?" --out heat.png
  cogvlm explain shapes.png "Where is the red square? answer in [[x0,y0,x1,y1]] format." \\
      --model examples/tiny-shapes --out heat.png --layers 0
  cogvlm explain photo.jpg "What colour is the car?" --answer "red" --out heat.png   # explain a given answer

The map is the decoder's attention from the positions that predict the answer's tokens to the image's patches,
averaged over heads, over those positions and over --layers (default: all), normalised to sum 1 over the patch
grid. It is computed on the plain attention path (explicit softmax(QK^T)) for one extra forward pass.
stdout: the answer on one line, then one line of JSON: {"layers", "grid" (rows of the patch grid, top to bottom),
"peak": [row, column], "image_share": per layer, the fraction of the answer's attention that went to the patches}.
"""


def layer_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of layer numbers") from None


layer_list.__name__ = "layer list"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("explain", parents=[model_options(), generation_options()], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="show where in the image the answer looked (an attention heatmap)",
                              description="Answer QUESTION about IMAGE and map the decoder's attention from the "
                                          "answer to the image patches, blended onto the image.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("question", metavar="QUESTION", type=text, help="the question")
    p.add_argument("--answer", type=text, help="explain this answer instead of generating one")
    p.add_argument("--layers", type=layer_list, metavar="I,J,...",
                   help="decoder layers to average, e.g. 0,1 or -1 for the last (default: all)")
    p.add_argument("--out", metavar="PICTURE", help="write the heatmap blended onto the image (.png, .jpg, ...)")
    p.add_argument("--alpha", type=float, default=0.55, help="heatmap opacity, 0-1 (default 0.55)")
    return p


def run(args) -> None:
    from ..explain import explain, heatmap
    from ..grounding import image_format, save_image
    from ..image import load_image

    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.out:
        try:
            image_format(args.out)
        except ValueError as e:
            raise UsageError(f"--out: {e}") from None
    image = load_image(args.image)
    model = load_model(args)
    n_layers = model.cfg.text.num_hidden_layers
    if args.layers is not None and (not args.layers or any(not -n_layers <= i < n_layers for i in args.layers)):
        raise UsageError(f"--layers: this model has decoder layers 0-{n_layers - 1} (or -{n_layers}..-1), "
                         f"got {args.layers}")
    result = explain(model, image, args.question, answer=args.answer, layers=args.layers, template=args.template,
                     **generation_kwargs(args))
    print(result.answer.replace("\n", "\\n"))
    print(json.dumps({"layers": result.layers, "grid": [[round(v, 5) for v in row] for row in result.grid.tolist()],
                      "peak": list(result.peak()), "image_share": [round(v, 4) for v in result.image_share.tolist()]}))
    sys.stdout.flush()
    if args.out:
        save_image(heatmap(image, result.grid, alpha=args.alpha), args.out)
        log(args, f"wrote {args.out}")
