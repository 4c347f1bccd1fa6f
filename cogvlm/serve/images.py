"""An image part's URL -> a decoded RGB image, within the operator's limits.

`data:image/*;base64,...` always (any format PIL reads); `http(s)://` only with --allow-remote-images; `file://`
only with --allow-local-images DIR, for files inside DIR (symlinks and `..` resolved first). The byte size is
checked before decoding (for base64, from its length), the pixel count from the header before any pixel is
decoded (decompression bombs), and whatever PIL cannot read is a 400 naming the image's place in the request.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image, UnidentifiedImageError

from ..image import ImageError, load_image
from .config import ServeConfig
from .protocol import APIError


def fetch_image(url: str, param: str, config: ServeConfig) -> Image.Image:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, param, config.max_image_bytes)
    elif scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise APIError(400, "remote image URLs are turned off on this server: send the image inline as a "
                                "data:image/...;base64 URL (or start the server with --allow-remote-images)",
                           param, "image_url_not_allowed")
        data = _download(url, param, config)
    elif scheme == "file":
        if config.local_images_dir is None:
            raise APIError(400, "file:// image URLs are turned off on this server: send the image inline as a "
                                "data:image/...;base64 URL (or start the server with --allow-local-images DIR)",
                           param, "image_url_not_allowed")
        data = _local_file(url, param, config)
    else:
        raise APIError(400, "an image URL must be a data:image/...;base64 URL"
                            f"{', http(s)://' if config.allow_remote_images else ''}"
                            f"{', file://' if config.local_images_dir else ''}; got {url[:40]!r}",
                       param, "invalid_image_url")
    return decode(data, param, config.max_image_pixels)


def decode(data: bytes, param: str, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except UnidentifiedImageError:
        raise APIError(400, "the image data is not an image format this server can read (PNG, JPEG, WebP, GIF, "
                            "BMP, TIFF, ...)", param, "invalid_image") from None
    except Image.DecompressionBombError:
        raise APIError(400, f"the image has too many pixels (at most {max_pixels})", param, "image_too_large") \
            from None
    except Exception as e:  # noqa: BLE001 - a broken header: any PIL error
        raise APIError(400, f"the image cannot be read: {type(e).__name__}: {e}", param, "invalid_image") from None
    if width * height > max_pixels:
        raise APIError(400, f"the image is {width}x{height} = {width * height} pixels, over this server's limit of "
                            f"{max_pixels}; scale it down", param, "image_too_large")
    try:
        return load_image(data)
    except ImageError as e:
        raise APIError(400, str(e).replace("<bytes>", "the image"), param, "invalid_image") from None


def _too_big(size: int, limit: int, param: str) -> APIError:
    return APIError(400, f"the image file is {size} bytes, over this server's limit of {limit}; send a smaller or "
                         "compressed image", param, "image_too_large")


def _data_url(url: str, param: str, limit: int) -> bytes:
    header, comma, payload = url.partition(",")
    media, *options = header[len("data:"):].split(";")
    if not comma or "base64" not in options:
        raise APIError(400, "a data URL image must be base64: data:image/png;base64,...", param, "invalid_image_url")
    if not media.lower().startswith("image/"):
        raise APIError(400, f"the data URL's media type is {media or 'missing'!r}; it must be image/* "
                            "(image/png, image/jpeg, ...)", param, "invalid_image_url")
    payload = "".join(payload.split())  # line breaks, as `base64` without -w0 writes them
    if len(payload) // 4 * 3 > limit + 2:  # checked before decoding anything
        raise _too_big(len(payload) // 4 * 3, limit, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"the data URL's base64 payload is invalid ({e})", param, "invalid_base64") from None
    if len(data) > limit:
        raise _too_big(len(data), limit, param)
    return data


def _download(url: str, param: str, config: ServeConfig) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "cogvlm-serve"})
    try:
        with urllib.request.urlopen(request, timeout=config.remote_timeout) as response:
            data = response.read(config.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"cannot fetch the image URL: {reason}", param, "image_fetch_failed") from None
    if len(data) > config.max_image_bytes:
        raise _too_big(len(data), config.max_image_bytes, param)
    return data


def _local_file(url: str, param: str, config: ServeConfig) -> bytes:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"a file:// URL names a file on this machine, not on {parsed.netloc!r}", param,
                       "invalid_image_url")
    path = os.path.realpath(urllib.parse.unquote(parsed.path))
    root = config.local_images_dir
    if os.path.commonpath([path, root]) != root:
        raise APIError(400, f"file:// image URLs must name files under {root}", param, "image_url_not_allowed")
    try:
        size = os.path.getsize(path)
        if size > config.max_image_bytes:
            raise _too_big(size, config.max_image_bytes, param)
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise APIError(400, f"cannot read the image file: {e.strerror}", param, "invalid_image") from None
