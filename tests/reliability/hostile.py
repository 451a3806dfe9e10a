"""Destinations that misbehave on purpose, for the fault tests: each a real server on 127.0.0.1.

Most are :class:`relay.sink.SinkServer` with a rule (garbage greeting, endless multi-line EHLO reply,
connection reset in the middle of DATA, a STARTTLS whose handshake fails). The sink has no tarpit, so
:class:`Tarpit` is here: it answers one byte per ``interval`` seconds, forever (a multi-line greeting that
never ends), holding every connection until the client gives up.

Every server is stopped by the test (``async with``); a stop aborts the connections still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from types import TracebackType

from relay.sink import SinkConfig, SinkServer

# aiosmtpd warns about every line it reads after a scripted mid-DATA disconnect; that is the fault at work.
logging.getLogger("mail.log").setLevel(logging.ERROR)


class Tarpit:
    """One byte per ``interval`` seconds of a greeting that never ends; with ``refuse`` set, new connections
    get ``554`` and are closed at once instead (to end a test's fault traffic)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.refuse = False
        self.open = 0
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Tarpit:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open += 1
        try:
            if self.refuse:
                writer.write(b"554 5.7.1 tarpit closed\r\n")
                await writer.drain()
                return
            for byte in itertools.cycle(b"220-tarpit.example please wait\r\n"):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(self.interval)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


#: The sink rule (behaviour, stage) that makes each kind of hostile destination.
SINK_FAULTS: dict[str, tuple[str, str]] = {
    "garbage": ("garbage", "connect"),          # a greeting that is not SMTP
    "endless": ("endless", "ehlo"),             # a multi-line EHLO reply that never ends
    "reset": ("disconnect:2000", "body"),       # the connection dropped in the middle of DATA
}


def hostile_sink(kind: str) -> SinkServer:
    """A sink misbehaving as ``kind``: one of :data:`SINK_FAULTS`, or "brokentls" (STARTTLS offered, the
    handshake fails)."""
    sink = SinkServer(SinkConfig(starttls="broken" if kind == "brokentls" else "off", keep_messages=False,
                                 timeout=30))
    misbehave(sink, kind)
    return sink


def misbehave(sink: SinkServer, kind: str) -> None:
    """(Re)apply the rule of ``kind`` (none for brokentls: that is the sink's STARTTLS mode)."""
    sink.clear_rules()
    if kind in SINK_FAULTS:
        behaviour, stage = SINK_FAULTS[kind]
        sink.set_rule("*", behaviour, stage=stage)  # type: ignore[arg-type]  # stages are checked by set_rule
