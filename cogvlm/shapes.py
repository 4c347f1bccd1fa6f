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

Grounding scenes hold 1-3 such shapes (each (colour, shape) at most once, boxes apart, sizes 20-60 % of the short
side for one shape, 20-45 % for two, 20-40 % for three), with the grounding checkpoints' two official prompts:

    "Where is the {colour} {shape}? answer in [[x0,y0,x1,y1]] format."   -> "[[x0,y0,x1,y1]]"   (one per shape)
    "Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] for each mentioned
     object?"  -> "a red circle [[...]], a blue square [[...]] and a green triangle [[...]]"   (left to right)

each coordinate relative to the image x 1000, three digits (`cogvlm.grounding.to_thousandths`).

    python -m cogvlm.shapes --out DIR --n N --seed S [--questions all|describe|random] [--min-side 64 --max-side 128]
        [--mix caption=1,ground=2,boxes=1]

writes `DIR/images/NNNNNN.png` and `DIR/data.jsonl` in the fine-tuning data format (docs/finetune.md), a record
per (image, question) with a `meta` object the loader ignores (shape, colour, rgb, background, bbox; for scenes a
list `shapes` of those and the `target`). Without `--mix` every image is a one-shape caption image; with it each
image's kind is drawn with those weights. The same seed gives the same files. `--evaluate MODEL` scores a model.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .grounding import format_box, to_thousandths
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
GROUND_QUESTION = "Where is the {colour} {shape}? answer in [[x0,y0,x1,y1]] format."
BOXES_QUESTION = ("Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] "
                  "for each mentioned object?")
SCENE_SIZE_RANGE = {1: (0.2, 0.6), 2: (0.2, 0.45), 3: (0.2, 0.4)}  # by the number of shapes: room for them all
SCENE_GAP = 2  # pixels at least between two shapes' boxes
KINDS = ("caption", "ground", "boxes")  # image kinds of --mix


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


    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box_text(self) -> str:
        """The box as the grounding models write it: '[[x0,y0,x1,y1]]', relative to the image x 1000."""
        return format_box(to_thousandths(self.bbox, (self.width, self.height)))


def sample_shape(rng: random.Random, width: int, height: int) -> ShapeSample:
    """Draw the parameters of one image of `width` x `height` pixels from `rng`."""
    if min(width, height) < 5:
        raise ValueError(f"image {width}x{height} is too small for a shape of 20-60 % of its short side")
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    rgb = _jitter(rng, colour)
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


def _jitter(rng: random.Random, colour: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in COLOURS[colour])


def _size_bounds(short: int, size_range: tuple[float, float] = SIZE_RANGE) -> tuple[int, int]:
    """Integer sizes whose ratio to `short` lies within `size_range`."""
    lo = -(-short * round(size_range[0] * 100) // 100)  # ceil(lo_fraction * short)
    hi = short * round(size_range[1] * 100) // 100  # floor(hi_fraction * short)
    return lo, max(lo, hi)


def _apart(a, b, gap: int = SCENE_GAP) -> bool:
    """Boxes a and b (x1/y1 exclusive) are at least `gap` pixels apart along x or along y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(rng: random.Random, width: int, height: int, count: int, tries: int = 1000) -> list[ShapeSample]:
    """`count` (1-3) shapes on one background: distinct (colour, shape) pairs, boxes SCENE_GAP apart.

    Sizes follow SCENE_SIZE_RANGE[count]; a shape's place is redrawn until it is clear of the others (at most
    `tries` draws per scene, far more than the 64-128 px images ever need).
    """
    if count not in SCENE_SIZE_RANGE:
        raise ValueError(f"a scene holds 1-3 shapes, not {count}")
    if min(width, height) < 16:
        raise ValueError(f"image {width}x{height} is too small for a scene; both sides must be >= 16")
    background = (255, 255, 255) if rng.random() < 0.5 else (rng.randint(*GREY_RANGE),) * 3
    kinds = rng.sample([(c, s) for c in sorted(COLOURS) for s in SHAPES], count)
    lo, hi = _size_bounds(min(width, height), SCENE_SIZE_RANGE[count])
    placed: list[ShapeSample] = []
    for _ in range(tries):
        colour, shape = kinds[len(placed)]
        size = rng.randint(lo, hi)
        x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
        box = (x0, y0, x0 + size, y0 + size)
        if all(_apart(box, p.bbox) for p in placed):
            placed.append(ShapeSample(shape, colour, _jitter(rng, colour), background, box, width, height))
            if len(placed) == count:
                return placed
    raise ValueError(f"could not place {count} shapes apart in a {width}x{height} image in {tries} draws")


def describe_with_boxes(scene: list[ShapeSample]) -> str:
    """The answer to BOXES_QUESTION: every shape with its box, left to right (then top to bottom)."""
    items = [f"a {s.name} {s.box_text()}" for s in sorted(scene, key=lambda s: (s.bbox[0], s.bbox[1]))]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def render(sample: ShapeSample) -> Image.Image:
    """The RGB image of a sample (no anti-aliasing: every pixel is the background or the fill colour)."""
    return render_scene([sample])


def render_scene(scene: list[ShapeSample]) -> Image.Image:
    """The RGB image of shapes sharing one image size and background (no anti-aliasing)."""
    first = scene[0]
    im = Image.new("RGB", (first.width, first.height), first.background)
    draw = ImageDraw.Draw(im)
    for sample in scene:
        _draw(draw, sample)
    return im


def _draw(draw: ImageDraw.ImageDraw, sample: ShapeSample) -> None:
    x0, y0, x1, y1 = sample.bbox
    box = [x0, y0, x1 - 1, y1 - 1]  # PIL boxes are inclusive
    if sample.shape == "circle":
        draw.ellipse(box, fill=sample.rgb)
    elif sample.shape == "square":
        draw.rectangle(box, fill=sample.rgb)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=sample.rgb)


def generate(
    out: str | Path,
    n: int,
    seed: int = 0,
    questions: str = "all",
    min_side: int = DEFAULT_SIDES[0],
    max_side: int = DEFAULT_SIDES[1],
    force: bool = False,
    mix: dict[str, float] | None = None,
) -> Path:
    """Write `n` images and their JSONL records to `out`; returns the JSONL path.

    questions: for caption images, "all" (three records per image, one per question), "describe" (only "Describe
    the image.") or "random" (one random question per image). mix: {kind: weight} over KINDS; None = caption
    images only (the original set, drawn exactly as before). "ground" images are scenes of 1-3 shapes with one
    "Where is" record per shape, "boxes" images scenes with the describe-with-boxes record.
    Written to a temporary folder and renamed into place when complete.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if questions not in ("all", "describe", "random"):
        raise ValueError(f"questions must be all, describe or random, not {questions!r}")
    if not 5 <= min_side <= max_side:
        raise ValueError(f"need 5 <= min_side <= max_side, got {min_side}, {max_side}")
    if mix is not None:
        _check_mix(mix)
        if min_side < 16:
            raise ValueError(f"scenes need --min-side >= 16, got {min_side}")
    out = Path(out)
    rng = random.Random(seed)
    with atomic_folder(out, force) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for i in range(n):
                width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
                kind = "caption" if mix is None else rng.choices(list(mix), weights=list(mix.values()))[0]
                name = f"images/{i:06d}.png"
                if kind == "caption":
                    sample = sample_shape(rng, width, height)
                    render(sample).save(tmp / name)
                    records = _caption_records(rng, sample, questions)
                else:
                    scene = sample_scene(rng, width, height, rng.randint(1, 3))
                    render_scene(scene).save(tmp / name)
                    records = _scene_records(scene, kind)
                for question, answer, meta in records:
                    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                    f.write(json.dumps({"image": name, "conversations": turns, "meta": meta}) + "\n")
    return out / "data.jsonl"


def _check_mix(mix: dict[str, float]) -> None:
    unknown = sorted(set(mix) - set(KINDS))
    if unknown or not mix:
        raise ValueError(f"mix kinds must be among {', '.join(KINDS)}; got {', '.join(unknown) or 'none'}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix weights must be >= 0 with a positive sum, got {mix}")


def _caption_records(rng: random.Random, sample: ShapeSample, questions: str):
    # The "random" choice is drawn whatever `questions` is, as the original generator did: same seed, same files.
    kinds = {"all": list(QUESTIONS), "describe": ["describe"], "random": [rng.choice(list(QUESTIONS))]}[questions]
    return [(QUESTIONS[k][0], sample.answer(k), {**asdict(sample), "question": k}) for k in kinds]


def _scene_records(scene: list[ShapeSample], kind: str):
    shapes_meta = [asdict(s) for s in scene]
    if kind == "boxes":
        return [(BOXES_QUESTION, describe_with_boxes(scene), {"shapes": shapes_meta, "question": "boxes"})]
    return [(GROUND_QUESTION.format(colour=s.colour, shape=s.shape), s.box_text(),
             {"shapes": shapes_meta, "target": i, "question": "ground"}) for i, s in enumerate(scene)]


def fresh_images(n: int, seed: int, min_side: int = DEFAULT_SIDES[0], max_side: int = DEFAULT_SIDES[1]):
    """The one-shape samples `generate(out, n, seed)` draws (its default settings), without writing them."""
    rng, samples = random.Random(seed), []
    for _ in range(n):
        samples.append(sample_shape(rng, rng.randint(min_side, max_side), rng.randint(min_side, max_side)))
        rng.choice(list(QUESTIONS))  # generate's draw for --questions random, made whatever the setting
    return samples


def fresh_scenes(n: int, seed: int, min_side: int = DEFAULT_SIDES[0], max_side: int = DEFAULT_SIDES[1]):
    """`n` scenes of 1-3 shapes, drawn like `generate`'s scenes."""
    rng = random.Random(seed)
    return [sample_scene(rng, rng.randint(min_side, max_side), rng.randint(min_side, max_side), rng.randint(1, 3))
            for _ in range(n)]


def evaluate(model, images: int = 300, scenes: int = 50, seed: int = 1234, scene_seed: int = 4321,
             batch_size: int = 50, attention: bool = True) -> dict:
    """Score `model` on fresh data, greedy: "Describe the image." exact match on `images` one-shape images (seed
    1234: the test set of docs/finetune.md), and on `scenes` scenes: IoU >= 0.5 of the first box of every "Where is"
    answer (in pixels) with the shape's true box, the describe-with-boxes answer right as a whole (every shape
    named, each with IoU >= 0.5) and, with `attention`, where the attention map's peak falls for the scene's first
    shape (`cogvlm.explain`): the peak patch's centre inside the box, or the patch overlapping it."""
    from .grounding import iou, parse_answer, to_pixels

    caption = fresh_images(images, seed)
    answers = model.chat_batch([render(s) for s in caption], [QUESTIONS["describe"][0]] * images,
                               batch_size=batch_size, max_new_tokens=16)
    result = {"caption_exact": sum(a.strip() == s.answer("describe") for a, s in zip(answers, caption)) / images}
    scene_list = fresh_scenes(scenes, scene_seed)
    pictures = [render_scene(sc) for sc in scene_list]
    asked = [(i, s) for i, sc in enumerate(scene_list) for s in sc]
    answers = model.chat_batch([pictures[i] for i, _ in asked], [GROUND_QUESTION.format(colour=s.colour,
                               shape=s.shape) for _, s in asked], batch_size=batch_size, max_new_tokens=24)
    ious = []
    for answer, (_, s) in zip(answers, asked):
        boxes = parse_answer(answer).boxes
        ious.append(iou(to_pixels(boxes[0][1], (s.width, s.height)), s.bbox) if boxes else 0.0)
    result.update(ground_iou50=sum(v >= 0.5 for v in ious) / len(ious), ground_mean_iou=sum(ious) / len(ious),
                  ground_questions=len(ious))
    answers = model.chat_batch(pictures, [BOXES_QUESTION] * scenes, batch_size=batch_size, max_new_tokens=80)
    result["boxes_all_right"] = sum(_boxes_right(a, sc) for a, sc in zip(answers, scene_list)) / scenes
    if attention:
        result.update(_attention_peaks(model, scene_list, pictures))
    return result


def _boxes_right(answer: str, scene: list[ShapeSample]) -> bool:
    from .grounding import iou, parse_answer, to_pixels

    found = {}
    for phrase, box in parse_answer(answer).boxes:
        found.setdefault(phrase.removeprefix("a "), to_pixels(box, (scene[0].width, scene[0].height)))
    return len(found) == len(scene) and all(s.name in found and iou(found[s.name], s.bbox) >= 0.5 for s in scene)


def _attention_peaks(model, scene_list, pictures) -> dict:
    """Fractions of scenes whose map peak (layers averaged, then each layer) lies on the first shape's box."""
    from .explain import explain

    hits: dict[str, int] = {}
    for scene, picture in zip(scene_list, pictures):
        s = scene[0]
        e = explain(model, picture, GROUND_QUESTION.format(colour=s.colour, shape=s.shape), max_new_tokens=24)
        for key, grid in [("", e.grid)] + [(f"_layer{i}", g) for i, g in enumerate(e.per_layer)]:
            n = grid.shape[0]
            row, col = divmod(int(grid.argmax()), n)
            cw, ch = s.width / n, s.height / n  # a patch's cell in the original image's pixels
            x0, y0, x1, y1 = s.bbox
            inside = x0 <= (col + 0.5) * cw < x1 and y0 <= (row + 0.5) * ch < y1  # the cell's centre
            overlaps = col * cw < x1 and x0 < (col + 1) * cw and row * ch < y1 and y0 < (row + 1) * ch
            hits[f"peak_inside{key}"] = hits.get(f"peak_inside{key}", 0) + inside
            hits[f"peak_overlaps{key}"] = hits.get(f"peak_overlaps{key}", 0) + overlaps
    return {k: v / len(scene_list) for k, v in hits.items()}


def parse_mix(text: str) -> dict[str, float]:
    """'caption=1,ground=2' -> {'caption': 1.0, 'ground': 2.0}."""
    mix = {}
    for part in text.split(","):
        kind, eq, weight = part.partition("=")
        try:
            mix[kind.strip()] = float(weight) if eq else 1.0
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not KIND=WEIGHT (e.g. caption=1,ground=2,boxes=1)") from None
    _check_mix(mix)
    return mix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cogvlm.shapes",
        description="Generate the Shapes synthetic data set (PNG images + data.jsonl in the fine-tuning format).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="output folder (must not exist unless --force)")
    what.add_argument("--evaluate", metavar="MODEL",
                      help="instead: score the checkpoint folder MODEL on 300 fresh images (seed 1234) and 50 fresh "
                           "scenes (seed 4321), printed as JSON (see `evaluate`)")
    p.add_argument("--n", type=int, help="number of images (required with --out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); the same seed gives the same files")
    p.add_argument("--questions", choices=["all", "describe", "random"], default="all",
                   help="caption images: all: 3 records per image (default); describe: only 'Describe the image.'; "
                        "random: one random question per image")
    p.add_argument("--mix", metavar="KIND=W,...",
                   help="draw each image's kind with these weights: caption (one shape, the questions above), "
                        "ground (1-3 shapes, 'Where is ...' per shape), boxes (1-3 shapes, described with boxes); "
                        "default: caption only")
    p.add_argument("--min-side", type=int, default=DEFAULT_SIDES[0], help="smallest image width/height (default 64)")
    p.add_argument("--max-side", type=int, default=DEFAULT_SIDES[1], help="largest image width/height (default 128)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.evaluate:
        import torch

        from .api import CogVLM

        model = CogVLM.from_pretrained(args.evaluate, device="cpu", dtype=torch.float32)
        print(json.dumps(evaluate(model)))
        return 0
    if args.n is None:
        p.error("--n is required with --out")
    try:
        mix = None if args.mix is None else parse_mix(args.mix)
        path = generate(args.out, args.n, args.seed, args.questions, args.min_side, args.max_side, args.force, mix)
    except (ValueError, OSError) as e:
        print(f"cogvlm.shapes: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.n} images and {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
