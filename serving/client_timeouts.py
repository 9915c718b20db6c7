"""Bounds on slow clients, which uvicorn's HTTP protocol leaves unbounded.

uvicorn times out only an idle keep-alive connection between two requests. A client that opens a connection
and sends nothing, sends its headers a byte at a time (slowloris), trickles its body, or stops reading a
stream (its TCP window shut) holds the connection, and for a stream an admission slot, for as long as it
likes. :func:`timed_protocol` is uvicorn's httptools protocol with two deadlines added, like nginx's
``client_header_timeout``/``client_body_timeout`` and ``send_timeout``:

- ``read_s``: a whole request (head and body) must arrive within this many seconds of its first byte (of the
  connection's opening, for the first). Past it the client gets ``408`` in the error envelope if no response
  has begun; the connection closes either way, and a handler waiting for the body sees a disconnect.
- ``write_s``: once the transport's write buffer is full (the client reads nothing), the client has this many
  seconds to start reading again; else the connection is aborted. The handler sees a disconnect, and a
  relayed stream frees its slot and aborts its engine request, as when a client leaves.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any, Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import APIError


def _raw_response(error: APIError) -> bytes:
    """``error`` as a whole HTTP/1.1 response that closes the connection."""
    body = json.dumps(error.body()).encode()
    return (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _cancel(timer: Optional[asyncio.TimerHandle]) -> None:
    """Cancels ``timer`` if it is set; returns None, for the attribute that held it."""
    if timer is not None:
        timer.cancel()


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for reading each request and one for a stalled write."""

    read_s: float = 60.0
    write_s: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: Optional[asyncio.TimerHandle] = None
        self._write_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._read_timer = _cancel(self._read_timer)
        self._write_timer = _cancel(self._write_timer)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:  # a keep-alive connection's next request: its own deadline
            self._arm_read()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._read_timer = _cancel(self._read_timer)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_s, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_timer = _cancel(self._write_timer)

    def _arm_read(self) -> None:
        self._read_timer = self.loop.call_later(self.read_s, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            error = APIError(408, f"the request did not arrive within {self.read_s:.0f} s; send the whole "
                                  f"request at once", code="request_timeout")
            self.transport.write(_raw_response(error))
        self.transport.close()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.transport.abort()  # close() would wait to flush a buffer the client does not read


def timed_protocol(read_s: float, write_s: float) -> type[TimedHttpProtocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) for these two deadlines, in seconds."""
    return type("TimedHttpProtocol", (TimedHttpProtocol,), {"read_s": read_s, "write_s": write_s})
