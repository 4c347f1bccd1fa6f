"""Grounding: the boxes in a CogVLM answer, in the original image's pixels, drawn on the image.

The grounding checkpoints (cogvlm-grounding-generalist-hf, base template) write a box as `[[x0,y0,x1,y1]]`: each
value is the coordinate relative to the image x 1000, three digits (000-999), x to the right and y down from the
top-left corner; several boxes of one phrase share a bracket, separated by `;`: `[[x0,y0,x1,y1;x0,y0,x1,y1]]`.
The model saw the image resized to a square, so the numbers are fractions of the *original* width and height:
pixel x = value / 1000 x width, pixel y = value / 1000 x height (not x 490 or x 224, the square's side).

Official prompts (the reference repository's template file):

    WHERE_PROMPT     "Where is <expr>? answer in [[x0,y0,x1,y1]] format."
    DESCRIBE_PROMPT  "Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] for
                      each mentioned object?"

`parse_answer` finds every box (also in prose, and a lenient `[x0,y0,x1,y1]`) and the phrase before it, and
reports malformed brackets instead of failing; `draw_boxes` draws them with labels; `ground(model, image, expr)`
asks the model and returns both.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SCALE = 1000  # a coordinate is written as round(relative position x 1000), three digits, 000-999
WHERE_PROMPT = "Where is {expression}? answer in [[x0,y0,x1,y1]] format."
DESCRIBE_PROMPT = ("Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] "
                   "for each mentioned object?")

# A double bracket, or a single one holding exactly four integers (some answers drop a bracket).
_BRACKET = re.compile(r"\[\[(?P<body>[^\[\]]*)\]\]|\[(?P<single>\s*\d+\s*(?:,\s*\d+\s*){3})\]")
_UNCLOSED = re.compile(r"\[\[[^\]]*$")  # a '[[' that the answer never closes (generation cut off)
_STRAY = re.compile(r"\[\[|\]\]")  # a double bracket left over once every box is taken out
_NUMBER = re.compile(r"\s*(\d{1,4})\s*")
_LEAD = re.compile(r"^(?:[\s,;:.]|and\b|with\b)+", re.IGNORECASE)  # list glue before a phrase


@dataclass
class Grounded:
    """One phrase of the answer and its boxes, in 000-999 (x0, y0, x1, y1)."""
    phrase: str
    boxes: list[tuple[int, int, int, int]]
    span: tuple[int, int]  # where the bracket is in the answer: answer[span[0]:span[1]]


@dataclass
class ParsedAnswer:
    text: str  # the answer with its boxes removed
    items: list[Grounded] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # malformed or unclosed brackets, out-of-range values

    @property
    def boxes(self) -> list[tuple[str, tuple[int, int, int, int]]]:
        """Every (phrase, box) pair, in answer order."""
        return [(item.phrase, box) for item in self.items for box in item.boxes]


def parse_box(text: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' -> four ints in 000-999 with x0 <= x1 and y0 <= y1; ValueError saying what is wrong."""
    if not text.strip():
        raise ValueError("empty brackets, a box needs 4 values (x0,y0,x1,y1)")
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"{len(parts)} values, a box needs 4 (x0,y0,x1,y1)")
    values = []
    for p in parts:
        m = _NUMBER.fullmatch(p)
        if m is None:
            raise ValueError(f"{p.strip()!r} is not an integer")
        values.append(int(m.group(1)))
    if max(values) >= SCALE:
        raise ValueError(f"a value above {SCALE - 1}: coordinates are 000-{SCALE - 1}")
    x0, y0, x1, y1 = values
    if x1 < x0:
        raise ValueError(f"x1 {x1} < x0 {x0}")
    if y1 < y0:
        raise ValueError(f"y1 {y1} < y0 {y0}")
    return x0, y0, x1, y1


def parse_answer(answer: str) -> ParsedAnswer:
    """Every box of `answer` with the phrase written before it (since the previous box or the sentence start).

    Never raises: a bracket that holds no valid box, a malformed box inside a `;` list (the others are kept), an
    unclosed `[[` at the end and any other unmatched `[[` or `]]` are listed in `problems`.
    """
    parsed = ParsedAnswer(text="")
    kept, last = [], 0
    for m in _BRACKET.finditer(answer):
        before = answer[last:m.start()]
        kept.append(before)
        last = m.end()
        body = m.group("body") if m.group("body") is not None else m.group("single")
        boxes = []
        for i, piece in enumerate(body.split(";")):
            try:
                boxes.append(parse_box(piece))
            except ValueError as e:
                where = f" (box {i + 1})" if ";" in body else ""
                parsed.problems.append(f"{m.group(0)!r}{where}: {e}")
        if boxes:
            parsed.items.append(Grounded(_phrase(before), boxes, (m.start(), m.end())))
    rest = answer[last:]
    unclosed = _UNCLOSED.search(rest)
    if unclosed:
        parsed.problems.append(f"{unclosed.group(0)!r}: '[[' without ']]'")
        rest = rest[:unclosed.start()]
    kept.append(rest)
    for segment in kept:
        for stray in _STRAY.finditer(segment):
            parsed.problems.append(f"{segment[stray.start():stray.start() + 20]!r}: unmatched {stray.group(0)!r}")
    parsed.text = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s{2,}", " ", "".join(kept))).strip()
    return parsed


def _phrase(before: str) -> str:
    """The phrase a box belongs to: the text since the last sentence end, without list glue ('and', ',')."""
    sentence = re.split(r"[.!?]\s", before)[-1]
    return _LEAD.sub("", sentence).strip()


def to_thousandths(box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A pixel box (x0, y0, x1, y1) of an image of `size` = (width, height) -> the model's 000-999 integers."""
    w, h = size
    return tuple(min(SCALE - 1, max(0, round(v * SCALE / side))) for v, side in zip(box, (w, h, w, h)))


def to_pixels(box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A 000-999 box -> pixels of the original image of `size` = (width, height): x = value / 1000 * width."""
    w, h = size
    return tuple(v * side / SCALE for v, side in zip(box, (w, h, w, h)))


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes in the same units; 0 when either is empty."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def format_box(box) -> str:
    """(x0, y0, x1, y1) in 000-999 -> '[[x0,y0,x1,y1]]' with three digits each, the grounding models' format."""
    return "[[" + ",".join(f"{int(v):03d}" for v in box) + "]]"


def boxes_record(answer: str, image_size: tuple[int, int], phrase: str = "") -> dict:
    """The parsed boxes of `answer` about an image of `image_size` = (width, height) as JSON-ready data (for
    `cogvlm caption --boxes` and `cogvlm ground`); `phrase` labels boxes written without one:

    {"boxes": [{"phrase", "box": [000-999 x4], "pixels": [x0, y0, x1, y1] rounded to 0.1 px}, ...],
     "problems": [...]}
    """
    parsed = parse_answer(answer)
    boxes = [{"phrase": p or phrase, "box": list(box), "pixels": [round(v, 1) for v in to_pixels(box, image_size)]}
             for p, box in parsed.boxes]
    return {"boxes": boxes, "problems": parsed.problems}


# Distinct, saturated colours; each phrase keeps its colour for all its boxes.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 128, 128), (170, 110, 40), (128, 0, 0))


def _contrast(rgb) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (by relative luminance)."""
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_boxes(image: Image.Image, boxes, width: int | None = None, font_size: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with `boxes` drawn: (label, (x0, y0, x1, y1) in pixels) pairs.

    Each distinct label gets a PALETTE colour; a box is a coloured line between two thin lines of the contrasting
    colour (black or white), so it shows on light and dark images alike; its label is written on a filled tab
    above the box (inside it when there is no room above). `width` (line width) and `font_size` default to sizes
    proportional to the image.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    width = width or max(2, round(short / 150))
    font = ImageFont.load_default(size=font_size or max(10, round(short / 30)))
    colours: dict[str, tuple[int, int, int]] = {}
    for label, box in boxes:
        colour = colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
        halo = _contrast(colour)
        x0, y0, x1, y1 = (round(v) for v in box)
        draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=halo, width=width + 2)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        if label:
            _label(draw, font, label, (x0 - 1, y0 - 1), colour, out.size)
    return out


def _label(draw, font, text, corner, colour, size) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = min(max(0, corner[0]), max(0, size[0] - tw))
    y = corner[1] - th if corner[1] - th >= 0 else max(0, corner[1])
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill=_contrast(colour), font=font)


def image_format(path) -> str:
    """The PIL format name of an output file, from its extension ('boxed.png' -> 'PNG'); ValueError if unknown."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write images as {ext or 'a file without extension'!r} ({path}); "
                         "use .png, .jpg or .webp")
    return fmt


def save_image(image: Image.Image, path) -> None:
    """Write `image` to `path` whole or not at all: to a temporary file beside it, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format=image_format(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Grounding:
    """What `ground` returns: the answer, its parse, and every box in the original image's pixels."""
    answer: str
    prompt: str
    expression: str | None
    image_size: tuple[int, int]  # (width, height) of the original image
    parsed: ParsedAnswer
    boxes: list[tuple[str, tuple[float, float, float, float]]]  # (phrase, pixel box)

    def record(self) -> dict:
        """{"answer", "prompt", "boxes": [{"phrase", "box" (000-999), "pixels"}], "problems"}, JSON-ready."""
        return {"answer": self.answer, "prompt": self.prompt,
                **boxes_record(self.answer, self.image_size, self.expression or "")}

    def draw(self, image: Image.Image, **kwargs) -> Image.Image:
        return draw_boxes(image, self.boxes, **kwargs)


def ground(model, image, expression: str | None = None, template: str | None = None, **generation) -> Grounding:
    """Ask `model` where `expression` is (WHERE_PROMPT) or, without one, for a description with boxes
    (DESCRIBE_PROMPT); returns the answer with its boxes converted to the pixels of the original `image` (a path,
    bytes, file object or PIL image). The prompt uses the model's template unless `template` says
    otherwise (the grounding checkpoints' is `base`); `generation` goes to `model.chat`. A box written without a
    phrase (the usual "Where is" answer) is labelled with `expression`.
    """
    from .image import load_image

    im = load_image(image)
    prompt = DESCRIBE_PROMPT if expression is None else WHERE_PROMPT.format(expression=expression)
    answer = model.chat(im, prompt, template=template, **generation)
    parsed = parse_answer(answer)
    boxes = [(phrase or expression or "", to_pixels(box, im.size)) for phrase, box in parsed.boxes]
    return Grounding(answer, prompt, expression, im.size, parsed, boxes)
