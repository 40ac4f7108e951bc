"""Images a generation request names by URL (`image_url`, `frame_images`), as PIL images.

Until the safe media fetcher lands this decodes `data:` URLs only; http(s) URLs are a 400.
"""

from __future__ import annotations

import base64
import binascii
import io

from k2serve.errors import bad_request

MAX_INPUT_PIXELS = 4096 * 4096


async def input_image(request, url, param: str):
    """The image `url` names (RGB), or a 400 naming `param`."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{param}' must be a URL string.", param=param)
    if not url.startswith("data:"):
        raise bad_request(f"'{param}': only data: URLs are accepted here.", param=param,
                          code="invalid_image_url")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise bad_request(f"'{param}': a data: URL must be base64.", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{param}': the data: URL is not valid base64.", param=param) from None
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise bad_request(f"'{param}': the image is too large.", param=param)
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError):
        raise bad_request(f"'{param}' is not an image this server can read.",
                          param=param, code="invalid_image") from None
    return image.convert("RGB")
