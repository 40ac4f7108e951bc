"""Images a generation request names by URL (`image_url`, `frame_images`), as PIL images,
fetched by the safe media fetcher (k2serve.media) under the operator's policy: data: URLs
always, http(s) only where K2SERVE_MEDIA_* allows it. Every refusal is a 400 naming the
parameter."""

from __future__ import annotations

from k2serve.errors import bad_request
from k2serve.media import MediaPolicy, fetch_image


def media_policy(app) -> MediaPolicy:
    """The app's policy (`app.state.media_policy`), read from the environment once."""
    policy = getattr(app.state, "media_policy", None)
    if policy is None:
        policy = app.state.media_policy = MediaPolicy.from_env()
    return policy


async def input_image(request, url, param: str):
    """The image `url` names (RGB), or a 400 naming `param`."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{param}' must be a URL string.", param=param)
    return await fetch_image(url, media_policy(request.app), param=param, mode="RGB")
