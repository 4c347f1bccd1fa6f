"""cogvlm.grounding: every box format of the grounding checkpoints (and garbage), coordinates on non-square images,
drawing checked pixel by pixel, `ground` and `cogvlm ground`."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from cogvlm import grounding, shapes
from cogvlm.grounding import (DESCRIBE_PROMPT, PALETTE, WHERE_PROMPT, boxes_record, draw_boxes, ground, iou, parse_answer,
                              to_pixels, to_thousandths)

ROOT = Path(__file__).parent.parent
TINY = ROOT / "examples" / "tiny-shapes"


def test_one_box():
    p = parse_answer("[[120,250,480,750]]")
    assert p.boxes == [("", (120, 250, 480, 750))]
    assert p.items[0].span == (0, 19) and p.problems == [] and p.text == ""


def test_several_boxes_each_with_its_phrase():
    answer = "a red circle [[100,200,300,400]], a blue square [[500,100,900,450]] and a green triangle [[050,600,250,990]]"
    p = parse_answer(answer)
    assert p.boxes == [("a red circle", (100, 200, 300, 400)), ("a blue square", (500, 100, 900, 450)),
                       ("a green triangle", (50, 600, 250, 990))]
    assert p.text == "a red circle, a blue square and a green triangle" and p.problems == []
    assert [answer[slice(*item.span)] for item in p.items][1] == "[[500,100,900,450]]"


def test_semicolon_list_is_several_boxes_of_one_phrase():
    p = parse_answer("Two dogs [[010,020,300,400;500,500,900,990]] are playing.")
    assert len(p.items) == 1 and p.items[0].phrase == "Two dogs"
    assert p.items[0].boxes == [(10, 20, 300, 400), (500, 500, 900, 990)]
    assert p.text == "Two dogs are playing."


def test_boxes_inside_prose():
    p = parse_answer("A man [[100,100,400,900]] is riding a horse [[300,400,900,950]]. The sky [[000,000,999,300]] "
                     "is clear, with the cat [12, 30, 400, 500] asleep.")
    assert p.boxes == [("A man", (100, 100, 400, 900)), ("is riding a horse", (300, 400, 900, 950)),
                       ("The sky", (0, 0, 999, 300)), ("is clear, with the cat", (12, 30, 400, 500))]
    assert p.text == "A man is riding a horse. The sky is clear, with the cat asleep." and p.problems == []


@pytest.mark.parametrize("answer, problem", [
    ("[[1,2,3]]", "3 values"),
    ("[[abc,1,2,3]]", "'abc' is not an integer"),
    ("[[1000,0,1000,5]]", "000-999"),
    ("[[500,500,100,900]]", "x1 100 < x0 500"),
    ("[[100,500,200,100]]", "y1 100 < y0 500"),
    ("[[]]", "empty brackets"),
    ("the car [[10,20,30,40", "'[[' without ']]'"),
    ("]] nothing [[ here", "unmatched"),
])
def test_malformed_boxes_are_reported(answer, problem):
    p = parse_answer(answer)
    assert p.boxes == [] and len(p.problems) >= 1 and problem in " ".join(p.problems), p.problems


def test_a_bad_box_in_a_list_keeps_the_good_ones():
    p = parse_answer("cats [[10,20,30,40;1,2;50,60,70,80]]")
    assert p.boxes == [("cats", (10, 20, 30, 40)), ("cats", (50, 60, 70, 80))]
    assert p.problems == ["'[[10,20,30,40;1,2;50,60,70,80]]' (box 2): 2 values, a box needs 4 (x0,y0,x1,y1)"]


def test_garbage_never_raises_and_boxes_are_always_valid():
    rng = random.Random(0)
    alphabet = "[[]],;0123456789 abc.\n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        p = parse_answer(text)
        for _, (x0, y0, x1, y1) in p.boxes:
            assert 0 <= x0 <= x1 <= 999 and 0 <= y0 <= y1 <= 999
    assert parse_answer("no boxes at all").boxes == []


def test_coordinates_are_fractions_of_the_original_non_square_image():
    # the model saw a square; 000-999 are thousandths of the ORIGINAL width and height
    assert to_pixels((100, 250, 500, 750), (640, 320)) == (64.0, 80.0, 320.0, 240.0)
    assert to_pixels((500, 500, 999, 999), (1000, 200)) == (500.0, 100.0, 999.0, 199.8)
    assert to_thousandths((64, 80, 320, 240), (640, 320)) == (100, 250, 500, 750)
    assert to_thousandths((0, 0, 640, 320), (640, 320)) == (0, 0, 999, 999)  # 1000 is written 999
    for w, h in ((37, 211), (1920, 1080), (90, 64)):
        for x in range(0, w, max(1, w // 17)):
            back = to_pixels(to_thousandths((x, 0, x, h), (w, h)), (w, h))
            assert abs(back[0] - x) <= w / 1000 and abs(back[3] - h) <= h / 1000 + 1e-9


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0 and iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_boxes_record_is_json_in_both_units():
    record = boxes_record("a cat [[100,200,300,400]] and [[1,2", (200, 100), phrase="fallback")
    assert json.loads(json.dumps(record)) == {
        "boxes": [{"phrase": "a cat", "box": [100, 200, 300, 400], "pixels": [20.0, 20.0, 60.0, 40.0]}],
        "problems": ["'[[1,2': '[[' without ']]'"]}
    assert boxes_record("[[500,000,999,999]]", (10, 10), phrase="the dog")["boxes"][0]["phrase"] == "the dog"


def test_drawing_puts_the_box_where_it_belongs():
    grey = (128, 128, 128)
    im = Image.new("RGB", (200, 120), grey)
    out = draw_boxes(im, [("thing", (40, 30, 160, 90))], width=3)
    assert out.size == im.size and im.getpixel((40, 60)) == grey  # a copy: the input is untouched
    colour, halo = PALETTE[0], (255, 255, 255)  # PALETTE[0] is dark: a white halo
    for x, y in ((40, 60), (42, 60), (160, 60), (158, 60), (100, 90), (100, 88)):  # the 3-px line, all 4 sides
        assert out.getpixel((x, y)) == colour, (x, y)
    assert out.getpixel((39, 60)) == halo and out.getpixel((43, 60)) == halo  # halo both sides of the line
    assert out.getpixel((161, 60)) == halo and out.getpixel((157, 60)) == halo
    assert out.getpixel((100, 60)) == grey and out.getpixel((5, 115)) == grey  # inside and far outside untouched
    assert out.getpixel((41, 27)) == colour  # the label's tab sits on top of the box, in the box's colour


def test_each_phrase_keeps_one_colour_and_labels_fit_at_the_edge():
    im = Image.new("RGB", (100, 100), (0, 0, 0))
    out = draw_boxes(im, [("a", (10, 0, 30, 20)), ("b", (50, 50, 90, 90)), ("a", (60, 5, 80, 25))], width=2)
    assert out.getpixel((10, 10)) == PALETTE[0] and out.getpixel((60, 15)) == PALETTE[0]
    assert out.getpixel((50, 70)) == PALETTE[1]
    tab = out.crop((10, 1, 20, 10))  # no room above y=0: the label's tab goes inside the box, at its top
    assert max(tab.getcolors())[1] == PALETTE[0] and len(tab.getcolors()) > 1  # the tab, with text on it


def test_light_colours_get_a_dark_halo_and_labels_are_written():
    yellow = PALETTE.index((255, 225, 25))
    boxes = [(str(i), (10 + i, 30, 80, 90)) for i in range(yellow + 1)]  # the last label gets the yellow
    out = draw_boxes(Image.new("RGB", (100, 100), (255, 255, 255)), boxes, width=2)
    x0 = 10 + yellow
    assert out.getpixel((x0, 60)) == PALETTE[yellow] and out.getpixel((x0 - 1, 60)) == (0, 0, 0)
    tab = out.crop((x0, 5, x0 + 10, 28))  # the label's tab above the box: yellow with black text on it
    colours = {c for _, c in tab.getcolors()}
    assert PALETTE[yellow] in colours and min(map(sum, colours)) < 30  # anti-aliased text: nearly black at its core


class Recorder:
    """A stand-in for a model: records the prompt and answers what it is told."""

    def __init__(self, answer):
        self.answer, self.queries = answer, []

    def chat(self, image, query, template=None, **generation):
        self.queries.append((image.size, query, template, generation))
        return self.answer


def test_ground_asks_the_official_prompts_and_returns_pixels():
    model = Recorder("[[250,100,750,900]]")
    result = ground(model, Image.new("RGB", (400, 200)), "the red car", template="base", max_new_tokens=30)
    assert model.queries == [((400, 200), "Where is the red car? answer in [[x0,y0,x1,y1]] format.", "base",
                              {"max_new_tokens": 30})]
    assert result.boxes == [("the red car", (100.0, 20.0, 300.0, 180.0))]
    assert result.record()["boxes"][0]["phrase"] == "the red car"
    model = Recorder("a dog [[000,000,500,500]] and a cat [[500,500,999,999]]")
    result = ground(model, Image.new("RGB", (100, 300)))
    assert model.queries[0][1] == DESCRIBE_PROMPT
    assert result.boxes == [("a dog", (0.0, 0.0, 50.0, 150.0)), ("a cat", (50.0, 150.0, 99.9, 299.7))]
    assert result.draw(Image.new("RGB", (100, 300))).size == (100, 300)


def cli_parser(module):
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_ground_prints_the_answer_and_boxes_and_draws(tmp_path, capsys, monkeypatch):
    """The command's plumbing on the real tiny model, whose answer is replaced by a box this test knows (the shipped
    tiny model does not ground yet)."""
    from cogvlm import CogVLM
    from cogvlm.cli import ground as ground_cli

    asked = []
    monkeypatch.setattr(CogVLM, "chat", lambda self, image, query, **kw: asked.append(query) or "[[100,200,600,900]]")
    scene = shapes.fresh_scenes(1, seed=5)[0]
    shapes.render_scene(scene).save(tmp_path / "scene.png")
    s = scene[0]
    args = cli_parser(ground_cli).parse_args(["ground", str(tmp_path / "scene.png"), f"the {s.name}", "--model",
                                              str(TINY), "--device", "cpu", "--dtype", "fp32", "--out",
                                              str(tmp_path / "boxed.png"), "--quiet"])
    ground_cli.run(args)
    answer, boxes = capsys.readouterr().out.splitlines()
    boxes = json.loads(boxes)
    assert asked == [WHERE_PROMPT.format(expression=f"the {s.name}")] and answer == "[[100,200,600,900]]"
    assert boxes[0]["box"] == [100, 200, 600, 900] and boxes[0]["phrase"] == f"the {s.name}"
    assert boxes[0]["pixels"] == [round(v, 1) for v in to_pixels(boxes[0]["box"], (s.width, s.height))]
    drawn, original = Image.open(tmp_path / "boxed.png").convert("RGB"), Image.open(tmp_path / "scene.png").convert("RGB")
    assert drawn.size == original.size == (s.width, s.height)
    x0, y0, x1, y1 = boxes[0]["pixels"]
    edge = (int(x0), int((y0 + y1) / 2))  # the middle of the box's left side is drawn over
    assert drawn.getpixel(edge) != original.getpixel(edge)


def test_cli_ground_rejects_a_bad_picture_name_before_loading(tmp_path):
    ground_cli = pytest.importorskip("cogvlm.cli.ground")
    from cogvlm.cli.options import UsageError

    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    args = cli_parser(ground_cli).parse_args(["ground", str(tmp_path / "x.png"), "--model", str(tmp_path / "none"),
                                              "--out", str(tmp_path / "boxed.xyz")])
    with pytest.raises(UsageError, match="boxed.xyz"):
        ground_cli.run(args)
