"""GET /v1/media/{name}: a generated image or video, by its signed link
(k2serve.api.media_links); no API key, the signature is the credential."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.media_links import MEDIA_TYPES, media_files

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/v1/media/{name}", summary="A generated image or video (signed link)")
async def get_media(request: Request, name: str, expires: str | None = None,
                    signature: str | None = None):
    path = media_files(request).verified_path(name, expires, signature)
    return FileResponse(path, media_type=MEDIA_TYPES[name.rsplit(".", 1)[1]],
                        headers={"cache-control": "private, max-age=300"})
