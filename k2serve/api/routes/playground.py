"""`/playground`: a web page to try every endpoint, as static files shipped in the package.

The page is public (it holds no data); its API calls carry the key the user types, kept in
the browser's session storage. Only the files listed at import are served, never a path the
client makes up, and a strict Content-Security-Policy lets the page talk to this origin alone.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from k2serve.errors import APIError

router = APIRouter(include_in_schema=False)

ROOT = Path(__file__).resolve().parent.parent / "static" / "playground"
PREFIX = "/playground"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
FILES = {p.relative_to(ROOT).as_posix(): p for p in sorted(ROOT.rglob("*"))
         if p.is_file() and p.suffix in _TYPES}
# blob: media is the speech reply and a recording; data: images are none yet, but harmless
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


@router.get(PREFIX)
async def playground_root():
    return RedirectResponse(PREFIX + "/", status_code=308)  # relative module URLs need the /


@router.get(PREFIX + "/{path:path}")
async def playground_file(path: str):
    file = FILES.get(path or "index.html")
    if file is None:
        raise APIError(404, f"No playground file {path!r}.", code="not_found")
    return FileResponse(file, media_type=_TYPES[file.suffix], headers=HEADERS)
