"""A raw SMTP client for protocol tests: send exact bytes, read exact replies, upgrade to TLS.

smtplib and aiosmtplib hide the wire (they add CRLF, dot-stuff, refuse odd input); protocol tests need
to send what a hostile or broken client would, so this one does nothing on its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from dataclasses import dataclass
from typing import ClassVar

from tests.support.logtap import register_secret


@dataclass
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        return self.lines[-1].split(" ", 1)[0] if self.lines else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawClient:
    # Every client still open; the suite's autouse fixture closes them after each test.
    open_clients: ClassVar[set[RawClient]] = set()

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        RawClient.open_clients.add(self)

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None,
                      local_addr: tuple[str, int] | None = None) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, local_addr=local_addr,
                                    server_hostname="localhost" if tls else None), 10)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10) -> Reply:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError(f"connection closed after {lines!r}")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            assert len(text) >= 3 and text[:3].isdigit(), f"malformed reply line {text!r}"
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return Reply(int(text[:3]), lines)
            assert text[3] == "-", f"malformed reply line {text!r}"

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> Reply:
        data = line if isinstance(line, bytes) else line.encode()
        await self.send(data + b"\r\n")
        return await self.reply()

    async def greeting(self) -> Reply:
        return await self.reply()

    async def ehlo(self, name: str = "client.test") -> Reply:
        return await self.cmd(f"EHLO {name}")

    async def starttls(self, context: ssl.SSLContext) -> Reply:
        reply = await self.cmd("STARTTLS")
        if reply.code == 220:
            await self.writer.start_tls(context, server_hostname="localhost")
        return reply

    async def auth_plain(self, username: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        register_secret(password)
        register_secret(token, with_base64=False)
        return await self.cmd(f"AUTH PLAIN {token}")

    async def mail(self, sender: str, recipients: list[str], body: bytes) -> Reply:
        """A whole transaction; returns the reply to the end of DATA (or the first failure)."""
        reply = await self.cmd(f"MAIL FROM:<{sender}>")
        if reply.code != 250:
            return reply
        for rcpt in recipients:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            if reply.code != 250:
                return reply
        reply = await self.cmd("DATA")
        if reply.code != 354:
            return reply
        return await self.cmd(body + b".")

    async def closed(self, timeout: float = 10) -> bool:
        """True when the server has closed the connection."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        await self.close()
        return data == b""

    async def close(self) -> None:
        RawClient.open_clients.discard(self)
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
