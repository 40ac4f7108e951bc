"""Decode fetched bytes into a PIL image without decoding a bomb: the pixel count comes
from the header (Image.open reads only that) and is checked before any pixel is decoded;
only the common web formats' decoders are used."""

from __future__ import annotations

import asyncio
import io
import warnings

from PIL import Image

from k2serve.errors import APIError
from k2serve.media.fetch import fetch_bytes
from k2serve.media.policy import MediaPolicy

# content type -> the one Pillow decoder allowed for it
IMAGE_CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG",
                       "image/webp": "WEBP", "image/gif": "GIF"}
FORMATS = sorted(set(IMAGE_CONTENT_TYPES.values()))


def _invalid(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_image")


def decode_image(data: bytes, policy: MediaPolicy, *, param: str | None = None,
                 mode: str | None = "RGB") -> Image.Image:
    """`data` as a fully decoded image (converted to `mode` unless None); an APIError(400)
    when it is not a PNG/JPEG/WebP/GIF or declares more than policy.max_pixels pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own global limit; the policy's limit, below, decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, policy, param) from None
    except Exception:  # noqa: BLE001 - any decoder failure is the upload's fault
        raise _invalid(f"The image could not be read: expected one of "
                       f"{', '.join(FORMATS)}.", param) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _invalid("The image has no pixels.", param)
    if width * height > policy.max_pixels:
        raise _too_many_pixels((width, height), policy, param)
    try:
        image.load()
        return image.convert(mode) if mode and image.mode != mode else image
    except Exception:  # noqa: BLE001 - a truncated or corrupt body
        raise _invalid("The image could not be decoded (truncated or corrupt).",
                       param) from None


def _too_many_pixels(size, policy: MediaPolicy, param: str | None) -> APIError:
    declared = f" declares {size[0]}x{size[1]} pixels," if size else " declares too many pixels,"
    return _invalid(f"The image{declared} more than the server's limit of "
                    f"{policy.max_pixels} pixels.", param)


async def fetch_image(url: str, policy: MediaPolicy, *, param: str | None = None,
                      mode: str | None = "RGB") -> Image.Image:
    """The image `url` names (data: or, when allowed, http(s)), decoded off the event loop."""
    media = await fetch_bytes(url, policy, accept=IMAGE_CONTENT_TYPES, param=param)
    return await asyncio.to_thread(decode_image, media.data, policy, param=param, mode=mode)
