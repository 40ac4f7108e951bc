"""uvicorn's HTTP/1.1 protocol with a deadline for each request's head.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but never one that has
sent nothing, or part of a request head, and stalls: each such connection is held open for
ever, so a client can pile them up (slowloris). The body has its own deadline once the app
reads it (k2serve.api.middleware.read_body); this covers the head.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 30.0


class HeadDeadlineH11Protocol(H11Protocol):
    """Closes a connection whose next request head is not complete within
    `header_timeout_s` of the connection opening or the previous response ending."""

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_deadline)

    def _head_deadline(self) -> None:
        # IDLE: no request head received since the timer was set. Once a head is in, the
        # request runs as long as it needs to.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def h11_protocol(header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`."""
    return type("HeadDeadlineH11Protocol", (HeadDeadlineH11Protocol,),
                {"header_timeout_s": header_timeout_s})
