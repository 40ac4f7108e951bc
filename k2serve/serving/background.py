"""Models that load on a worker thread after start-up, so `serve` answers within seconds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Callable, Generic, TypeVar

from k2serve.errors import APIError

T = TypeVar("T")
log = logging.getLogger("k2serve.serving")

# One loader at a time: two big models loading at once on a 2-core machine only slow each
# other (and the chat model that is already serving).
_LOAD_LOCK = threading.Lock()


class BackgroundModel(Generic[T]):
    """`load()` runs once on a daemon thread; requests `await model.get()`, which waits for
    the load (a 503 with retry-after past `wait_s`) or raises a 503 naming the load error."""

    def __init__(self, name: str, load: Callable[[], T], *, announce: bool = True) -> None:
        self.name = name
        self._load = load
        self._announce = announce
        self._future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundModel[T]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"load-{self.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        with _LOAD_LOCK:
            started = time.monotonic()
            try:
                value = self._load()
            except BaseException as exc:  # noqa: BLE001 - reported to every request
                log.error("k2serve: loading %s failed: %s", self.name, exc)
                self._future.set_exception(exc)
                return
            if self._announce:
                print(f"k2serve: {self.name} ready ({time.monotonic() - started:.1f} s)",
                      flush=True)
            self._future.set_result(value)

    @property
    def state(self) -> str:
        if not self._future.done():
            return "loading"
        return "failed" if self._future.exception() is not None else "ready"

    def result(self, timeout: float | None = None) -> T:
        """Blocking form, for scripts and tests."""
        self.start()
        return self._future.result(timeout)

    async def get(self, wait_s: float = 300.0) -> T:
        self.start()
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)),
                                          wait_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"The model {self.name} is still loading; retry shortly.",
                           type="server_error", code="model_loading",
                           headers={"retry-after": "10"}) from None
        except APIError:
            raise
        except Exception as exc:
            raise APIError(503, f"The model {self.name} failed to load: {exc}",
                           type="server_error", code="model_load_failed") from None
