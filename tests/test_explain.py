"""cogvlm.explain: the plain attention path changes nothing but exposes the weights, the map's grid shape and
normalisation, layer choice, that the map follows the shape, the heatmap picture, and `cogvlm explain`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cogvlm import CogVLM, shapes
from cogvlm.chat import build_batch
from cogvlm.explain import PlainAttention, colormap, explain, heatmap, plain_attention
from cogvlm.visual_expert import VisualExpertAttention

TINY = Path(__file__).parent.parent / "examples" / "tiny-shapes"


@pytest.fixture(scope="module")
def tiny():
    return CogVLM.from_pretrained(TINY, device="cpu", dtype=torch.float32)


def square(x0: int, y0: int, size: int = 40, side: int = 112) -> tuple[Image.Image, shapes.ShapeSample]:
    s = shapes.ShapeSample("square", "red", (220, 20, 20), (255, 255, 255), (x0, y0, x0 + size, y0 + size), side, side)
    return shapes.render(s), s


def test_plain_attention_gives_the_fast_path_outputs_and_is_undone(tiny):
    image, _ = square(10, 20)
    batch = build_batch(tiny, [image, square(60, 60)[0]], ["Describe the image.", "What shape is it? Really?"])
    fast = tiny(**batch).logits  # left padded: the masked path
    with plain_attention(tiny) as attns:
        assert len(attns) == 2 and all(type(a) is PlainAttention for a in attns)
        assert attns[0].vision_expert_qkv is tiny.llm.layers[0].attn.vision_expert_qkv  # shared, not copied
        plain = tiny(**batch).logits
    torch.testing.assert_close(plain, fast, rtol=1e-4, atol=1e-4)
    assert all(type(layer.attn) is VisualExpertAttention for layer in tiny.llm.layers)
    with pytest.raises(RuntimeError), plain_attention(tiny):
        raise RuntimeError("boom")
    assert all(type(layer.attn) is VisualExpertAttention for layer in tiny.llm.layers)  # restored after an error


def test_kept_weights_are_a_softmax_over_the_keys(tiny):
    batch = build_batch(tiny, [square(10, 20)[0]], ["Describe the image."])
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), plain_attention(tiny) as attns:
        attns[1].keep_rows, attns[1].keep_keys = torch.arange(L), torch.arange(L)
        tiny(batch["input_ids"], batch["token_type_ids"], pixel_values=batch["pixel_values"])
    w = attns[1].kept[0]  # (L, L), mean over heads
    torch.testing.assert_close(w.sum(-1), torch.ones(L))
    assert (w.triu(1) == 0).all() and (w >= 0).all()  # causal


def test_map_shape_normalisation_and_layers(tiny):
    image, _ = square(30, 40)
    e = explain(tiny, image, "Describe the image.", max_new_tokens=8)
    g = tiny.cfg.vision.image_size // tiny.cfg.vision.patch_size
    assert e.answer == "a red square"
    assert e.grid.shape == (g, g) and e.per_layer.shape == (tiny.cfg.text.num_hidden_layers, g, g)
    assert (e.grid >= 0).all() and float(e.grid.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(e.per_layer.sum((1, 2)), torch.ones(2))
    assert ((0 < e.image_share) & (e.image_share <= 1)).all() and e.layers == [0, 1]
    last = explain(tiny, image, "Describe the image.", answer=e.answer, layers=[-1])
    assert last.layers == [1]
    torch.testing.assert_close(last.grid, e.per_layer[1])
    with pytest.raises(ValueError, match="layers"):
        explain(tiny, image, "Describe the image.", answer="a", layers=[2])


@pytest.mark.parametrize("shape, colour, rgb", [("circle", "red", (220, 20, 20)), ("square", "blue", (20, 40, 220)),
                                               ("triangle", "yellow", (230, 200, 20))])
def test_the_map_follows_the_shape(tiny, shape, colour, rgb):
    """One shape in the top-left quarter, then moved into the right half, then into the bottom half: the map's peak
    moves into the half the shape moved to, and its centre of mass moves by at least one patch that way."""
    side, size = tiny.cfg.vision.image_size, tiny.cfg.vision.image_size * 2 // 5

    def where(x0: int, y0: int):
        s = shapes.ShapeSample(shape, colour, rgb, (255, 255, 255), (x0, y0, x0 + size, y0 + size), side, side)
        e = explain(tiny, shapes.render(s), "What colour is the shape?", max_new_tokens=4)
        n = e.grid.shape[0]
        at = torch.arange(n, dtype=torch.float32)
        return e.peak(), ((e.grid.sum(1) * at).sum().item(), (e.grid.sum(0) * at).sum().item()), n

    m = side // 20  # a margin
    (row, col), (cy, cx), n = where(m, m)
    (row_r, col_r), (cy_r, cx_r), _ = where(side - size - m, m)  # moved right
    (row_d, col_d), (cy_d, cx_d), _ = where(m, side - size - m)  # moved down
    assert col < n / 2 <= col_r and row < n / 2 <= row_d, ((row, col), (row_r, col_r), (row_d, col_d))
    assert cx_r - cx >= 1 and abs(cy_r - cy) < 1, (cx, cx_r, cy, cy_r)
    assert cy_d - cy >= 1 and abs(cx_d - cx) < 1, (cy, cy_d, cx, cx_d)


def test_heatmap_picture():
    image = Image.new("RGB", (160, 80), (40, 120, 200))
    grid = torch.zeros(8, 8)
    grid[0, 7] = 1.0  # all attention on the top-right patch
    assert heatmap(image, grid, alpha=0).tobytes() == image.tobytes()
    hot = heatmap(image, grid, alpha=1, smooth=False)
    assert hot.size == image.size
    assert hot.getpixel((155, 5)) == colormap(1.0) and hot.getpixel((5, 75)) == colormap(0.0)
    assert sum(colormap(1.0)) > 600 and sum(colormap(0.0)) < 10  # bright on the peak, dark elsewhere
    smooth = heatmap(image, grid, alpha=0.5)
    assert sum(smooth.getpixel((155, 5))) > sum(smooth.getpixel((5, 75)))
    with pytest.raises(ValueError, match="alpha"):
        heatmap(image, grid, alpha=2)


def test_cli_explain(tmp_path, capsys):
    explain_cli = pytest.importorskip("cogvlm.cli.explain")  # the cogvlm.cli package (being split out of cli.py)
    square(60, 8)[0].save(tmp_path / "sq.png")
    parser = argparse.ArgumentParser()
    explain_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", str(tmp_path / "sq.png"), "Describe the image.", "--model", str(TINY),
                              "--device", "cpu", "--dtype", "fp32", "--layers", "0", "--out",
                              str(tmp_path / "heat.png"), "--quiet"])
    explain_cli.run(args)
    answer, data = capsys.readouterr().out.splitlines()
    data = json.loads(data)
    assert answer == "a red square" and data["layers"] == [0] and len(data["grid"]) == 8
    assert sum(map(sum, data["grid"])) == pytest.approx(1.0, abs=1e-3)
    assert Image.open(tmp_path / "heat.png").size == (112, 112)
