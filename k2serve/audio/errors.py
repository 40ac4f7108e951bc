"""What an audio request got wrong, said so that the API layer can answer it as a 4xx."""

from __future__ import annotations


class AudioRequestError(ValueError):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
