"""Images a generation request names by URL (`image_url`, `frame_images`), as PIL images,
fetched by the safe media fetcher (k2serve.media) under the app's policy
(`app.state.media_policy`: data: URLs always, http(s) only where the operator allows it).
Every refusal is a 400 naming the parameter."""

from __future__ import annotations

from k2serve.errors import bad_request
from k2serve.media import fetch_image


async def input_image(request, url, param: str):
    """The image `url` names (RGB), or a 400 naming `param`."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{param}' must be a URL string.", param=param)
    return await fetch_image(url, request.app.state.media_policy, param=param, mode="RGB")
