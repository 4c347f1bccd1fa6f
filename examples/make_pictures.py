"""The pictures of README.md and docs/grounding.md, made with a shipped tiny model on Shapes it never saw.

    python examples/make_pictures.py [--model examples/tiny-shapes] [--out docs]

writes OUT/explain.png (fresh one-shape images and where the model looked answering "What colour is the shape?") and,
with a model that grounds, OUT/grounding.png (a fresh scene with the boxes the model gave for each shape).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from cogvlm import CogVLM, shapes
from cogvlm.explain import explain, heatmap
from cogvlm.grounding import draw_boxes, ground

ZOOM = 3  # the images are ~100 px: drawn on a 3x copy (nearest) so that cells and labels are legible


def zoomed(image: Image.Image) -> Image.Image:
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def strip(panels: list[Image.Image], gap: int = 8) -> Image.Image:
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)),
                    (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def explain_picture(model, seed: int = 77) -> Image.Image:
    panels = []
    for sample in shapes.fresh_images(3, seed):
        picture = shapes.render(sample)
        e = explain(model, picture, "What colour is the shape?", max_new_tokens=8)
        print(f"{sample.name}: answer {e.answer!r}, peak cell {e.peak()}")
        panels += [zoomed(picture), heatmap(zoomed(picture), e.grid)]
    return strip(panels)


def grounding_picture(model, seed: int = 2024) -> Image.Image:
    scene = next(sc for sc in shapes.fresh_scenes(20, seed) if len(sc) == 3)
    picture, boxes = shapes.render_scene(scene), []
    for s in scene:
        result = ground(model, picture, f"the {s.name}", max_new_tokens=24)
        print(f"{s.name}: true {s.box_text()}, answer {result.answer!r}")
        boxes += [(label, tuple(v * ZOOM for v in box)) for label, box in result.boxes]
    return strip([zoomed(picture), draw_boxes(zoomed(picture), boxes)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).parent / "tiny-shapes"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs")
    ap.add_argument("--grounding", action="store_true", help="also the boxes picture (for a model that grounds)")
    args = ap.parse_args()
    model = CogVLM.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    explain_picture(model).save(args.out / "explain.png", optimize=True)
    if args.grounding:
        grounding_picture(model).save(args.out / "grounding.png", optimize=True)


if __name__ == "__main__":
    main()
