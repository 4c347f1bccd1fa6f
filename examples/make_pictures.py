"""The pictures of README.md and docs/grounding.md, made with the shipped examples/tiny-ground on Shapes scenes it
never saw (scene seed 2024; the training drew seeds 1000-1015 and 2).

    python examples/make_pictures.py [--model examples/tiny-ground] [--out docs]

writes OUT/grounding.png (two fresh scenes of three shapes, each shape's box as the model gave it for "Where is the
{colour} {shape}?") and OUT/explain.png (the first of those scenes, then, for each of its shapes, where the model
looked answering that question: `cogvlm.explain`'s map, all decoder layers averaged).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from cogvlm import CogVLM, shapes
from cogvlm.explain import explain, heatmap
from cogvlm.grounding import WHERE_PROMPT, draw_boxes, ground, iou

ZOOM = 3  # the images are ~100 px: drawn on a 3x copy (nearest) so that cells and labels are legible


def zoomed(image: Image.Image) -> Image.Image:
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def captioned(panel: Image.Image, text: str, band: int = 22) -> Image.Image:
    """`panel` with `text` on a white band below it."""
    out = Image.new("RGB", (panel.width, panel.height + band), (255, 255, 255))
    out.paste(panel, (0, 0))
    ImageDraw.Draw(out).text((4, panel.height + 3), text, fill=(0, 0, 0), font=ImageFont.load_default(size=15))
    return out


def strip(panels: list[Image.Image], gap: int = 8) -> Image.Image:
    """The panels side by side, each framed in grey (a scene's background may be white)."""
    out = Image.new("RGB", (sum(p.width + 2 for p in panels) + gap * (len(panels) - 1),
                            max(p.height + 2 for p in panels)), (255, 255, 255))
    draw, x = ImageDraw.Draw(out), 0
    for p in panels:
        draw.rectangle([x, 0, x + p.width + 1, p.height + 1], outline=(150, 150, 150))
        out.paste(p, (x + 1, 1))
        x += p.width + 2 + gap
    return out


def three_shape_scenes(n: int, seed: int = 2024) -> list[list[shapes.ShapeSample]]:
    """The first `n` scenes of three shapes among `shapes.fresh_scenes(40, seed)` (no other choice made)."""
    return [sc for sc in shapes.fresh_scenes(40, seed) if len(sc) == 3][:n]


def grounding_picture(model, scenes) -> Image.Image:
    panels = []
    for scene in scenes:
        picture, boxes = shapes.render_scene(scene), []
        for s in scene:
            result = ground(model, picture, f"the {s.name}", max_new_tokens=24)
            got = result.boxes[0][1] if result.boxes else None
            print(f"{s.name}: true {s.bbox}, answer {result.answer!r}, IoU {iou(got, s.bbox) if got else 0:.2f}")
            boxes += [(s.name, tuple(v * ZOOM for v in box)) for _, box in result.boxes]
        panels.append(draw_boxes(zoomed(picture), boxes))
    return strip(panels)


def explain_picture(model, scene) -> Image.Image:
    picture = shapes.render_scene(scene)
    panels = [captioned(zoomed(picture), "the scene")]
    for s in scene:
        e = explain(model, picture, WHERE_PROMPT.format(expression=f"the {s.name}"), max_new_tokens=24)
        row, col = e.peak()
        n = e.grid.shape[0]
        cx, cy = (col + 0.5) * s.width / n, (row + 0.5) * s.height / n
        x0, y0, x1, y1 = s.bbox
        print(f"{s.name}: answer {e.answer!r}, peak cell {(row, col)}, its centre inside the shape's box: "
              f"{x0 <= cx < x1 and y0 <= cy < y1}")
        panels.append(captioned(heatmap(zoomed(picture), e.grid), f"Where is the {s.name}?"))
    return strip(panels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).parent / "tiny-ground"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs")
    args = ap.parse_args()
    model = CogVLM.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    scenes = three_shape_scenes(2)
    grounding_picture(model, scenes).save(args.out / "grounding.png", optimize=True)
    explain_picture(model, scenes[0]).save(args.out / "explain.png", optimize=True)


if __name__ == "__main__":
    main()
