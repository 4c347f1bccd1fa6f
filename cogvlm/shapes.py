"""Shapes: a synthetic visual question answering set that proves a model learns to see.

Each image holds one filled shape on a white or light-grey background:

- shape:  circle, square or triangle (an upright isosceles triangle whose base and height are the shape's size);
- colour: red (220,20,20), green (20,160,20), blue (20,40,220) or yellow (230,200,20), each channel jittered by
  up to +-20 (then clipped to 0..255);
- size:   20-60 % of the image's short side (the side of the shape's square bounding box);
- place:  anywhere, the whole bounding box inside the image.

Shapes are drawn without anti-aliasing, so every pixel is either background or the fill colour.
Questions (asked with the chat template at training and inference time) and their answers:

    "Describe the image."        -> "a {colour} {shape}"
    "What colour is the shape?"  -> "{colour}"
    "What shape is it?"          -> "{shape}"

    python -m cogvlm.shapes --out DIR --n N --seed S [--questions all|describe|random] [--min-side 64 --max-side 128]

writes `DIR/images/NNNNNN.png` and `DIR/data.jsonl` in the fine-tuning data format (see docs/finetune.md): one
record per (image, question), image paths relative to the JSONL file. Each record also carries a `meta` object
(shape, colour, rgb, background, bbox) that the loader ignores. The same seed gives the same files.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .shards import atomic_folder

COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 160, 20),
    "blue": (20, 40, 220),
    "yellow": (230, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
JITTER = 20  # per channel, uniform in [-JITTER, JITTER]
SIZE_RANGE = (0.2, 0.6)  # shape size as a fraction of the image's short side
GREY_RANGE = (200, 235)  # a light-grey background has this grey level (else it is white)
QUESTIONS = {
    "describe": ("Describe the image.", "a {colour} {shape}"),
    "colour": ("What colour is the shape?", "{colour}"),
    "shape": ("What shape is it?", "{shape}"),
}
DEFAULT_SIDES = (64, 128)  # image width and height are each drawn from this range (inclusive)


@dataclass
class ShapeSample:
    shape: str
    colour: str
    rgb: tuple[int, int, int]  # the fill colour actually used (after jitter)
    background: tuple[int, int, int]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the shape's square box, x1/y1 exclusive
    width: int
    height: int

    @property
    def size(self) -> int:
        return self.bbox[2] - self.bbox[0]

    def answer(self, kind: str) -> str:
        return QUESTIONS[kind][1].format(colour=self.colour, shape=self.shape)


def sample_shape(rng: random.Random, width: int, height: int) -> ShapeSample:
    """Draw the parameters of one image of `width` x `height` pixels from `rng`."""
    if min(width, height) < 5:
        raise ValueError(f"image {width}x{height} is too small for a shape of 20-60 % of its short side")
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    rgb = tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in COLOURS[colour])
    if rng.random() < 0.5:
        background = (255, 255, 255)
    else:
        g = rng.randint(*GREY_RANGE)
        background = (g, g, g)
    short = min(width, height)
    lo, hi = _size_bounds(short)
    size = rng.randint(lo, hi)
    x0 = rng.randint(0, width - size)
    y0 = rng.randint(0, height - size)
    return ShapeSample(shape, colour, rgb, background, (x0, y0, x0 + size, y0 + size), width, height)


def _size_bounds(short: int) -> tuple[int, int]:
    """Integer sizes whose ratio to `short` lies within SIZE_RANGE."""
    lo = -(-short * 2 // 10)  # ceil(0.2 * short)
    hi = short * 6 // 10  # floor(0.6 * short)
    return lo, max(lo, hi)


def render(sample: ShapeSample) -> Image.Image:
    """The RGB image of a sample (no anti-aliasing: every pixel is the background or the fill colour)."""
    im = Image.new("RGB", (sample.width, sample.height), sample.background)
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = sample.bbox
    box = [x0, y0, x1 - 1, y1 - 1]  # PIL boxes are inclusive
    if sample.shape == "circle":
        draw.ellipse(box, fill=sample.rgb)
    elif sample.shape == "square":
        draw.rectangle(box, fill=sample.rgb)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=sample.rgb)
    return im


def generate(
    out: str | Path,
    n: int,
    seed: int = 0,
    questions: str = "all",
    min_side: int = DEFAULT_SIDES[0],
    max_side: int = DEFAULT_SIDES[1],
    force: bool = False,
) -> Path:
    """Write `n` images and their JSONL records to `out`; returns the JSONL path.

    questions: "all" (three records per image, one per question), "describe" (only "Describe the image.") or
    "random" (one random question per image). Written to a temporary folder and renamed into place when complete.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if questions not in ("all", "describe", "random"):
        raise ValueError(f"questions must be all, describe or random, not {questions!r}")
    if not 5 <= min_side <= max_side:
        raise ValueError(f"need 5 <= min_side <= max_side, got {min_side}, {max_side}")
    out = Path(out)
    rng = random.Random(seed)
    with atomic_folder(out, force) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for i in range(n):
                width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
                sample = sample_shape(rng, width, height)
                name = f"images/{i:06d}.png"
                render(sample).save(tmp / name)
                kinds = {"all": list(QUESTIONS), "describe": ["describe"], "random": [rng.choice(list(QUESTIONS))]}
                for kind in kinds[questions]:
                    record = {
                        "image": name,
                        "conversations": [
                            {"role": "user", "content": QUESTIONS[kind][0]},
                            {"role": "assistant", "content": sample.answer(kind)},
                        ],
                        "meta": {**asdict(sample), "question": kind},
                    }
                    f.write(json.dumps(record) + "\n")
    return out / "data.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cogvlm.shapes",
        description="Generate the Shapes synthetic data set (PNG images + data.jsonl in the fine-tuning format).",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); the same seed gives the same files")
    p.add_argument("--questions", choices=["all", "describe", "random"], default="all",
                   help="all: 3 records per image (default); describe: only 'Describe the image.'; "
                        "random: one random question per image")
    p.add_argument("--min-side", type=int, default=DEFAULT_SIDES[0], help="smallest image width/height (default 64)")
    p.add_argument("--max-side", type=int, default=DEFAULT_SIDES[1], help="largest image width/height (default 128)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        path = generate(args.out, args.n, args.seed, args.questions, args.min_side, args.max_side, args.force)
    except (ValueError, OSError) as e:
        print(f"cogvlm.shapes: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.n} images and {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
