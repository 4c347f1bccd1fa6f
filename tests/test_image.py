"""cogvlm.image: parity with the reference transform, every input kind, odd modes, broken inputs."""

import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cogvlm.image import ImageError, load_image, preprocess

FIXTURES = Path(os.environ.get("COGVLM_FIXTURES", Path(__file__).parent / "fixtures" / "hf_reference"))
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
IMAGE_SIZE = MANIFEST["config"]["vision_config"]["image_size"]

# Single-image cases with a stored pixel_values tensor. Batch cases list `images` instead of `image`;
# their rows are the single cases' images, so checking the single cases covers them.
PIXEL_CASES = [
    name
    for name, case in MANIFEST["cases"].items()
    if case.get("image")
    and "pixel_values" in case.get("tensors", {})
    and case["tensors"]["pixel_values"]["shape"][0] == 1
]


def test_fixture_has_pixel_cases():
    assert PIXEL_CASES


@pytest.mark.parametrize("case", PIXEL_CASES)
def test_matches_reference(case):
    expected = load_file(str(FIXTURES / f"{case}.safetensors"))["pixel_values"][0]
    got = preprocess(FIXTURES / MANIFEST["cases"][case]["image"], IMAGE_SIZE)
    assert got.dtype == torch.float32 and got.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_batch_rows_match_reference():
    # Batch cases (`images` list) hold the same transform per row.
    for name, case in MANIFEST["cases"].items():
        if case.get("images") and "pixel_values" in case.get("tensors", {}):
            expected = load_file(str(FIXTURES / f"{name}.safetensors"))["pixel_values"]
            got = torch.stack([preprocess(FIXTURES / img, IMAGE_SIZE) for img in case["images"]])
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_all_input_kinds_agree():
    path = FIXTURES / MANIFEST["images"][0]
    data = path.read_bytes()
    ref = preprocess(path, IMAGE_SIZE)
    with open(path, "rb") as f:
        from_file = preprocess(f, IMAGE_SIZE)
        assert not f.closed  # a caller's file object is left open
    with Image.open(path) as im:
        from_pil = preprocess(im, IMAGE_SIZE)
    others = [preprocess(str(path), IMAGE_SIZE), preprocess(data, IMAGE_SIZE), preprocess(io.BytesIO(data), IMAGE_SIZE)]
    for got in others + [from_file, from_pil]:
        assert torch.equal(got, ref)


def test_load_image_returns_detached_rgb(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (7, 5), (10, 20, 30)).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (7, 5)
    p.unlink()  # the returned image does not depend on the file
    assert im.getpixel((0, 0)) == (10, 20, 30)


def _gradient(size=(20, 12)):
    im = Image.new("RGB", size)
    im.putdata([(x * 12 % 256, y * 20 % 256, (x + y) * 7 % 256) for y in range(size[1]) for x in range(size[0])])
    return im


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "CMYK", "P"])
def test_odd_modes_work_like_convert_rgb(tmp_path, mode):
    src = _gradient().convert(mode)
    fmt = {"CMYK": "TIFF"}.get(mode, "PNG")
    p = tmp_path / f"img.{fmt.lower()}"
    src.save(p, fmt)
    got = preprocess(p, 16)
    assert got.shape == (3, 16, 16) and torch.isfinite(got).all()
    # Reference behaviour: a plain .convert('RGB') (alpha dropped), then the transform.
    with Image.open(p) as im:
        expected = preprocess(im.convert("RGB"), 16)
    assert torch.equal(got, expected)


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    p = tmp_path / "t.png"
    Image.new("RGBA", (4, 4), (200, 10, 10, 0)).save(p)
    assert load_image(p).getpixel((0, 0)) == (200, 10, 10)


def test_palette_with_transparency(tmp_path, recwarn):
    p = tmp_path / "pt.png"
    pal = _gradient().convert("P", palette=Image.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    pal.save(p, transparency=0)
    with Image.open(p) as im:
        assert im.mode == "P" and "transparency" in im.info
        expected = im.convert("RGBA").convert("RGB").tobytes()
    assert load_image(p).tobytes() == expected
    assert not [w for w in recwarn if "Transparency" in str(w.message)]


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    values = [0, 255, 256, 1000, 32768, 65535]
    im16 = Image.new("I;16", (len(values), 1))
    im16.putdata(values)
    im16.save(p)
    rgb = load_image(p)
    assert [rgb.getpixel((i, 0)) for i in range(len(values))] == [(v >> 8,) * 3 for v in values]
    # Same for an in-memory I;16 and I image.
    assert load_image(im16).tobytes() == rgb.tobytes()
    assert load_image(im16.convert("I")).tobytes() == rgb.tobytes()


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as im:
        assert getattr(im, "n_frames", 1) == 3
    assert load_image(p).getpixel((3, 3)) == (255, 0, 0)


# ---- broken inputs: one error type, the message names the source ----

def _png_bytes():
    buf = io.BytesIO()
    _gradient((64, 64)).save(buf, "PNG")
    return buf.getvalue()


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png.*not found"):
        load_image(p)


def test_directory(tmp_path):
    with pytest.raises(ImageError, match=str(tmp_path.name)):
        load_image(tmp_path)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, not an image")
    with pytest.raises(ImageError, match="notes.png.*not a recognised image"):
        preprocess(p, 16)
    with pytest.raises(ImageError, match="<bytes>"):
        load_image(b"plain text")
    with pytest.raises(ImageError, match="<file object>"):
        load_image(io.BytesIO(b"plain text"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    _gradient((64, 64)).save(buf, fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}"):
        load_image(p)
    with pytest.raises(ImageError, match="<bytes>"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_bytes())  # 64*64 = 4096 pixels
    # PIL raises above 2 * MAX_IMAGE_PIXELS; lower the limit instead of writing a huge file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="bomb.png.*decompression bomb"):
        load_image(p)


def test_error_is_value_error():
    assert issubclass(ImageError, ValueError)


def test_bad_image_size():
    with pytest.raises(ValueError):
        preprocess(Image.new("RGB", (4, 4)), 0)


# EXIF orientation -> the transpose that turns the stored pixels upright (the EXIF 2.3 table).
ORIENTATIONS = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def upright_picture() -> Image.Image:
    """40x24 with a distinct colour in each corner, so that every rotation and flip gives other pixels."""
    im = Image.new("RGB", (40, 24), (128, 128, 128))
    for (x, y), colour in zip([(0, 0), (30, 0), (0, 16), (30, 16)], [(255, 0, 0), (0, 255, 0), (0, 0, 255),
                                                                      (255, 255, 0)]):
        im.paste(colour, (x, y, x + 10, y + 8))
    return im


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])  # lossless formats that carry EXIF, so pixels compare exactly
def test_exif_orientation_gives_the_upright_picture(tmp_path, orientation, fmt):
    """A camera stores the sensor's pixels plus a tag saying how to turn them; the model sees the picture upright,
    as a viewer shows it, whatever the way in (path, bytes, PIL image, preprocess)."""
    upright = upright_picture()
    inverse = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
               Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}
    method = ORIENTATIONS[orientation]
    stored = upright if method is None else upright.transpose(inverse.get(method, method))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{fmt.lower()}"
    save = dict(lossless=True) if fmt == "WEBP" else {}
    stored.save(path, fmt, exif=exif, **save)
    for src in (path, path.read_bytes(), Image.open(path)):
        got = load_image(src)
        assert got.size == upright.size and got.tobytes() == upright.tobytes(), (orientation, type(src))
        assert load_image(got).tobytes() == upright.tobytes()  # turning is applied once, not again
    torch.testing.assert_close(preprocess(path, 28), preprocess(upright, 28), atol=0, rtol=0)


def test_a_broken_exif_block_is_ignored(tmp_path):
    path = tmp_path / "broken-exif.png"
    upright_picture().save(path, "PNG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert load_image(path).tobytes() == upright_picture().tobytes()


def test_errors_name_the_source_as_told():
    with pytest.raises(ImageError, match=r"^cannot read image <stdin>: not a recognised image format$"):
        load_image(b"not an image", name="<stdin>")


def test_resizing_early_gives_the_same_pixels():
    """The caption job resizes in its decode threads; preprocess must then give exactly what it gives from the file."""
    from cogvlm.image import resize_for_model

    for name in MANIFEST["images"]:
        early = resize_for_model(load_image(FIXTURES / name), IMAGE_SIZE)
        assert torch.equal(preprocess(early, IMAGE_SIZE), preprocess(FIXTURES / name, IMAGE_SIZE))
