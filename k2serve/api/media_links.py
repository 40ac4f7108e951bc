"""Generated images and videos, kept in a directory and handed out as expiring signed links.

A link is `/v1/media/{name}?expires=UNIX&signature=HEX`, the signature an HMAC-SHA256 of
`name` and `expires` under the server's secret: no API key is needed to fetch it (the link
is the credential, as a presigned URL is), it cannot be altered or extended, and it stops
working at `expires`. The secret is kept in the directory (`.secret`, mode 600), so links
outlive a restart; the app without a platform uses a temporary directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

from starlette.requests import HTTPConnection

from k2serve.errors import APIError

NAME = re.compile(r"(img|vid)_[0-9a-f]{32}\.(png|jpeg|webp|mp4)")
PATH = re.compile(r"/v1/media/[A-Za-z0-9._-]{1,64}")  # what the platform lets through keyless
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
               "mp4": "video/mp4"}
IMAGE_LINK_TTL_S = 3600.0  # OpenAI's image URLs last an hour
# Generated files are deleted this long after they are made (a link to one then gets 404).
RETENTION_S = {"img": 24 * 3600.0, "vid": 7 * 24 * 3600.0}


class MediaFiles:
    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = Path(directory) if directory is not None else None
        self._secret: bytes | None = None

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="k2serve-media-"))
        self._directory.mkdir(parents=True, exist_ok=True)
        return self._directory

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            path = self.directory / ".secret"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
            self._secret = bytes.fromhex(path.read_text().strip())
        return self._secret

    def new_name(self, kind: str, extension: str) -> str:
        return f"{kind}_{secrets.token_hex(16)}.{extension}"

    def write(self, name: str, data: bytes) -> None:
        """Atomically (a crash leaves no half file under the name)."""
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)

    def exists(self, name: str) -> bool:
        return (self.directory / name).is_file()

    def delete(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def prune(self, kind: str, now: float | None = None) -> None:
        """Delete the `kind` files (img, vid) older than their RETENTION_S."""
        limit = (now or time.time()) - RETENTION_S[kind]
        for path in self.directory.glob(f"{kind}_*"):
            try:
                if path.stat().st_mtime < limit:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def _signature(self, name: str, expires: int) -> str:
        return hmac.new(self.secret, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def link(self, base_url: str, name: str, ttl_s: float) -> str:
        expires = int(time.time() + ttl_s)
        return (f"{base_url.rstrip('/')}/v1/media/{name}?expires={expires}"
                f"&signature={self._signature(name, expires)}")

    def verified_path(self, name: str, expires: str | None, signature: str | None) -> Path:
        """The file a link names, if its signature is right and it has not expired; else a
        403 (bad or expired link) or 404 (the file is gone)."""
        if (not NAME.fullmatch(name) or not expires or not expires.isdigit()
                or not signature or len(signature) > 128):
            raise APIError(403, "This media link is not valid: it lacks its expiry or "
                                "signature.", code="invalid_signature")
        if not hmac.compare_digest(self._signature(name, int(expires)), signature):
            raise APIError(403, "This media link's signature does not match.",
                           code="invalid_signature")
        if int(expires) < time.time():
            raise APIError(403, "This media link has expired; request the object again for "
                                "a fresh link.", code="link_expired")
        path = self.directory / name
        if not path.is_file():
            raise APIError(404, "This media file no longer exists.", code="not_found")
        return path


def media_files(request_or_app) -> MediaFiles:
    """The app's media files, from a request or from the app itself."""
    if isinstance(request_or_app, HTTPConnection):
        return request_or_app.app.state.media_files
    return request_or_app.state.media_files


def base_url(request) -> str:
    """The server's address as the client reached it (links work from where it asked)."""
    return str(request.base_url)
