"""cogvlm.shapes: the synthetic Shapes set obeys its spec, is seeded, and is readable by the fine-tuning loader."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from cogvlm import shapes
from cogvlm.data import read_jsonl


def samples(n=300, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        w, h = rng.randint(20, 200), rng.randint(20, 200)
        s = shapes.sample_shape(rng, w, h)
        yield s, np.asarray(shapes.render(s)).astype(int)


def test_colours_within_jitter_and_backgrounds_light():
    seen = set()
    for s, _ in samples():
        base = shapes.COLOURS[s.colour]
        assert all(abs(c - b) <= shapes.JITTER and 0 <= c <= 255 for c, b in zip(s.rgb, base)), (s.colour, s.rgb)
        r, g, b = s.background
        assert r == g == b and (r == 255 or shapes.GREY_RANGE[0] <= r <= shapes.GREY_RANGE[1])
        seen.add((s.shape, s.colour))
    assert len(seen) == len(shapes.SHAPES) * len(shapes.COLOURS)  # every combination occurs


def test_size_range_and_inside_image():
    for s, _ in samples():
        x0, y0, x1, y1 = s.bbox
        assert x1 - x0 == y1 - y0 == s.size
        assert 0.2 <= s.size / min(s.width, s.height) <= 0.6
        assert 0 <= x0 and 0 <= y0 and x1 <= s.width and y1 <= s.height


def test_pixels_are_the_shape_and_nothing_else():
    fill = {k: [] for k in shapes.SHAPES}
    for s, a in samples():
        assert a.shape == (s.height, s.width, 3)
        fg = (a != np.array(s.background)).any(-1)
        assert (a[fg] == np.array(s.rgb)).all()  # no anti-aliasing: fill colour or background
        assert (a[~fg] == np.array(s.background)).all()
        ys, xs = np.nonzero(fg)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == s.bbox  # the shape spans its box exactly
        if s.size >= 12:
            fill[s.shape].append(fg.sum() / s.size**2)
    # the drawn shape is the labelled one: squares fill their box, circles ~pi/4 of it, triangles ~1/2
    assert min(fill["square"]) == 1.0
    assert 0.7 < min(fill["circle"]) and max(fill["circle"]) < 0.9
    assert 0.4 < min(fill["triangle"]) and max(fill["triangle"]) < 0.65


def test_answers():
    s = shapes.ShapeSample("triangle", "yellow", (230, 200, 20), (255, 255, 255), (0, 0, 10, 10), 20, 20)
    assert [s.answer(k) for k in ("describe", "colour", "shape")] == ["a yellow triangle", "yellow", "triangle"]
    assert shapes.QUESTIONS["describe"][0] == "Describe the image."
    assert shapes.QUESTIONS["colour"][0] == "What colour is the shape?"
    assert shapes.QUESTIONS["shape"][0] == "What shape is it?"


def test_generator_is_seeded_and_writes_the_data_format(tmp_path):
    a = shapes.generate(tmp_path / "a", n=6, seed=3)
    b = shapes.generate(tmp_path / "b", n=6, seed=3)
    c = shapes.generate(tmp_path / "c", n=6, seed=4)
    assert a.read_text() == b.read_text() != c.read_text()
    for i in range(6):
        name = f"images/{i:06d}.png"
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(records) == 18  # three questions per image
    for r in records:
        meta = r["meta"]
        im = Image.open(a.parent / r["image"])
        assert im.size == (meta["width"], meta["height"]) and 64 <= min(im.size) and max(im.size) <= 128
        user, assistant = r["conversations"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        kind = meta["question"]
        assert user["content"] == shapes.QUESTIONS[kind][0]
        assert assistant["content"] == shapes.QUESTIONS[kind][1].format(colour=meta["colour"], shape=meta["shape"])
    examples = read_jsonl(a)
    assert len(examples) == 18 and examples[0].image == str(a.parent / "images/000000.png")


def test_generator_options_and_cli(tmp_path):
    path = shapes.generate(tmp_path / "d", n=5, seed=0, questions="describe", min_side=30, max_side=30)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 5 and all(r["meta"]["question"] == "describe" for r in records)
    assert all(Image.open(path.parent / r["image"]).size == (30, 30) for r in records)
    with pytest.raises(FileExistsError):
        shapes.generate(tmp_path / "d", n=5)
    assert shapes.main(["--out", str(tmp_path / "e"), "--n", "2", "--seed", "1", "--questions", "random"]) == 0
    assert len((tmp_path / "e" / "data.jsonl").read_text().splitlines()) == 2
    assert shapes.main(["--out", str(tmp_path / "e"), "--n", "2"]) == 1  # exists, no --force
