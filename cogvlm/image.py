"""Image loading and preprocessing, matching the CogVLM reference transform.

The reference (`build_conversation_input_ids` in cogvlm-chat-hf) does::

    image.convert('RGB')
    transforms.Resize((S, S), interpolation=BICUBIC)   # PIL bicubic on a PIL image, aspect ignored
    transforms.ToTensor()                              # uint8 HWC -> float CHW, / 255
    transforms.Normalize(CLIP_MEAN, CLIP_STD)          # (x - mean) / std, float32

This module reproduces that bit for bit without torchvision, and adds robust loading: every way an
input can be broken surfaces as one error type, `ImageError`, naming the source and the problem.

Photos are turned upright by their EXIF orientation tag first (`ImageOps.exif_transpose`), as image viewers and
browsers show them: a phone photo taken in portrait stores landscape pixels plus "rotate 90", and the model should see
what the user sees. The reference does not do this (it sees such photos sideways); for images without the tag, or with
orientation 1, nothing changes.
"""

from __future__ import annotations

import io
import os
import struct
from typing import IO, Union

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageError", "ImageSource", "load_image", "resize_for_model", "preprocess"]

# OpenAI CLIP statistics, the values the reference passes to transforms.Normalize.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = Union[str, os.PathLike, bytes, bytearray, IO[bytes], Image.Image]


class ImageError(ValueError):
    """An image could not be read or decoded. The message names the source and what is wrong."""


def _source_name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return "<file object>"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    Like the reference this is a plain `.convert('RGB')` (alpha is dropped, not composited, so RGBA/LA
    inputs give the same tensor as the reference). Two modes get special handling:
    - 16/32-bit integer grayscale: PIL's convert clips values to 255, turning almost every pixel white.
      We treat the data as 16-bit and scale by 1/256 instead (65535 -> 255), which is what the pixels mean.
    - palette with transparency: converting straight to RGB gives the same colours but PIL warns,
      so we go through RGBA and drop alpha there.
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # point() with a linear lambda is evaluated exactly by PIL: floor(v / 256) == v >> 8.
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    # convert() always returns a new image (a copy when already RGB), detached from any open file.
    return im.convert("RGB")


def _upright(im: Image.Image) -> Image.Image:
    """`im` turned as its EXIF orientation says (a no-op once applied: exif_transpose removes the tag). An EXIF block
    too broken to read is ignored, as viewers ignore it: the pixels are still good."""
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return im


def load_image(src: ImageSource, name: str | None = None) -> Image.Image:
    """Load `src` (path, bytes, binary file object or PIL image) as an upright RGB PIL image.

    Multi-frame files (animated GIF, multi-page TIFF) give their first frame. Raises `ImageError` for a
    missing/unreadable file, data that is not an image, a truncated image, or a decompression bomb
    (more pixels than PIL's `Image.MAX_IMAGE_PIXELS` safety limit allows). `name` is how errors call the source
    (default: the path, or `<bytes>`, `<file object>`, `<PIL image>`), e.g. `<stdin>`.
    """
    name = name or _source_name(src)
    try:
        if isinstance(src, Image.Image):
            return _to_rgb(_upright(src))
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
        # The context manager closes files PIL opened itself; a caller's file object is left open.
        with Image.open(fp) as im:
            im.seek(0)  # first frame of animations
            im.load()  # decode now, inside the try, so truncated data is caught here
            return _to_rgb(_upright(im))
    except FileNotFoundError:
        raise ImageError(f"cannot read image {name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"cannot read image {name}: is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"cannot read image {name}: too many pixels, possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated"), SyntaxError
        # (bad header in some plugins) or ValueError/EOFError; PermissionError is an OSError too.
        raise ImageError(f"cannot read image {name}: {type(e).__name__}: {e}") from None


def resize_for_model(image: Image.Image, image_size: int) -> Image.Image:
    """The reference's resize: bicubic to image_size x image_size, the aspect ratio ignored. An image already of that
    size is returned as a copy (PIL does not resample it), so resizing early (the caption job does it in its decode
    threads, to keep only small images in memory) gives exactly the same pixels."""
    return image.resize((image_size, image_size), Image.BICUBIC)


def preprocess(image: ImageSource, image_size: int) -> torch.Tensor:
    """Reference image transform: RGB, bicubic resize to image_size x image_size, /255, CLIP normalise.

    Returns a float32 tensor of shape [3, image_size, image_size].
    """
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    im = resize_for_model(load_image(image), image_size)
    # Same arithmetic as ToTensor + Normalize: uint8 -> float32, / 255, then (x - mean) / std.
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = x.view(image_size, image_size, 3).permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std
