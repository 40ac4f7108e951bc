"""Media inputs that requests name by URL (chat `image_url` parts, `frame_images`,
image-to-image inputs), fetched under the operator's `MediaPolicy`.

API:
    policy = MediaPolicy.from_env()          # or MediaPolicy(allow_http=True, ...)
    media = await fetch_bytes(url, policy, accept=("video/mp4",))   # -> FetchedMedia
    image = await fetch_image(url, policy)   # -> PIL.Image.Image, RGB, fully decoded

`data:` URLs are always accepted; `http(s)` only when the policy enables it, for hosts on its
allow-list that resolve to public addresses (the connection is pinned to the address that
was checked). Every refusal is an APIError(400) whose message says what was refused and why.
"""

from k2serve.media.fetch import FetchedMedia, fetch_bytes
from k2serve.media.images import IMAGE_CONTENT_TYPES, decode_image, fetch_image
from k2serve.media.policy import MediaPolicy

__all__ = ["FetchedMedia", "IMAGE_CONTENT_TYPES", "MediaPolicy", "decode_image",
           "fetch_bytes", "fetch_image"]
