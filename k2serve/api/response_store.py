"""Stored Responses (`store: true`): what `GET /v1/responses/{id}` returns and what
`previous_response_id` continues from, per owner (the API key; None in open mode).

The routes use a `ResponseStore` from `app.state.response_store`: this module's in-memory one
when the app has no platform, the platform's database-backed one otherwise
(k2serve.platform.response_store). Calls are synchronous (a database round trip): routes run
them off the event loop.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

MEMORY_CAPACITY = 10_000  # responses kept by the in-memory store; the oldest go first


@dataclass
class StoredResponse:
    id: str
    owner: str | None  # the API key id
    response: dict  # the Response object, as GET returns it (status, output, usage, ...)
    # The conversation it was generated from: the stored history (previous_response_id) and
    # then this request's own input items, from index `new_from` on. Instructions are not
    # items: they are not carried to the next response (as OpenAI documents).
    items: list[dict] = field(default_factory=list)
    new_from: int = 0

    @property
    def status(self) -> str:
        return self.response.get("status") or "completed"

    @property
    def background(self) -> bool:
        return bool(self.response.get("background"))

    @property
    def created_at(self) -> float:
        return float(self.response.get("created_at") or 0.0)


class ResponseStore(Protocol):
    def save(self, record: StoredResponse) -> None:
        """Insert the record, or replace the one with its id."""

    def load(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The record, if it exists and belongs to `owner`."""

    def delete(self, response_id: str, owner: str | None) -> bool:
        """Remove the record of `owner`; False when there is none."""


class MemoryResponseStore:
    """A process's responses, for an app without a platform (lost on restart)."""

    def __init__(self, capacity: int = MEMORY_CAPACITY):
        self.capacity = capacity
        self._records: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()  # routes call from worker threads

    def save(self, record: StoredResponse) -> None:
        with self._lock:
            self._records[record.id] = copy.deepcopy(record)
            self._records.move_to_end(record.id)
            while len(self._records) > self.capacity:
                self._records.popitem(last=False)

    def load(self, response_id: str, owner: str | None) -> StoredResponse | None:
        with self._lock:
            record = self._records.get(response_id)
            if record is None or record.owner != owner:
                return None
            return copy.deepcopy(record)

    def delete(self, response_id: str, owner: str | None) -> bool:
        with self._lock:
            record = self._records.get(response_id)
            if record is None or record.owner != owner:
                return False
            del self._records[response_id]
            return True
