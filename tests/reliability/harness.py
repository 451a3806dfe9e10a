"""What the reliability drivers share: a real relay in a subprocess, a recording sink, checkable messages.

- :class:`RelayProcess` runs ``python -m relay.cli --config FILE serve`` (the production entry point)
  on a fixed loopback port, so it can be SIGKILLed by its PID and started again on the same port; each
  incarnation logs JSON to its own file, which is handed to the suite's log tap (secret scan).
- :func:`relay_config` writes the relay.toml those processes read: one relay listener on 127.0.0.1
  trusting loopback, every domain routed to one loopback host (the sink), fresh secrets.
- :class:`RecordingSink` is the :class:`relay.sink.SinkServer` noting, for every accepted message, its
  Message-ID, whether its body still matches the hash the message carries, and the "epoch" (how many
  relay kills had happened) at which it arrived.
- :func:`build_message` / :func:`check_message`: every test message carries ``X-Body-SHA256``, the
  SHA-256 of its body, so a truncated or altered delivery is recognised, whoever altered it.

Everything binds 127.0.0.1; processes are stopped by their PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from relay.sink import ReceivedMessage, SinkConfig, SinkServer, _SinkSession
from tests.support.logtap import register_secret

REPO = Path(__file__).resolve().parents[2]
HASH_HEADER = b"X-Body-SHA256"
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.MULTILINE | re.IGNORECASE)
_BODY_HASH = re.compile(rb"^X-Body-SHA256: ([0-9a-f]{64})\r$", re.MULTILINE | re.IGNORECASE)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- messages ---------------------------------------------------------------------------------------------

#: Body text is cut from this pool (random letters, digits, spaces and punctuation) at random places:
#: as varied as drawing every character, a hundred times cheaper (20,000 messages are built per run).
_POOL = bytes(random.Random(20261123).choice(b"abcdefghijklmnopqrstuvwxyz0123456789 .,-") for _ in range(1 << 16))


def build_message(message_id: str, recipients: list[str], rng: random.Random, *,
                  size: int | None = None) -> bytes:
    """A message whose body hash is in its header; some body lines start with a dot (stuffing)."""
    target = size if size is not None else _message_size(rng)
    lines: list[bytes] = []
    length = 0
    while length < target:
        width = rng.randint(0, 76)
        start = rng.randrange(len(_POOL) - width)
        text = _POOL[start:start + width]
        if rng.random() < 0.05:
            text = b"." + text          # must survive dot-stuffing and unstuffing
        lines.append(text + b"\r\n")
        length += len(text) + 2
    body = b"".join(lines)
    digest = hashlib.sha256(body).hexdigest().encode()
    head = (b"From: <sender@reliability.test>\r\n"
            + b"To: " + ", ".join(f"<{r}>" for r in recipients).encode() + b"\r\n"
            + b"Subject: reliability " + message_id.encode() + b"\r\n"
            + b"Message-ID: <" + message_id.encode() + b">\r\n"
            + HASH_HEADER + b": " + digest + b"\r\n\r\n")
    return head + body


def _message_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.85:
        return rng.randint(200, 4_000)
    if roll < 0.98:
        return rng.randint(4_000, 60_000)
    return rng.randint(60_000, 400_000)


def dot_stuffed(message: bytes) -> bytes:
    """The message as it goes on the wire after DATA, terminator included."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


@dataclass(frozen=True)
class Checked:
    message_id: str | None
    intact: bool


def check_message(data: bytes) -> Checked:
    """The Message-ID of a delivered message and whether its body still matches its hash."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return Checked(None, False)
    head, body = data[:end + 2], data[end + 4:]
    found_id = _MESSAGE_ID.search(head)
    found_hash = _BODY_HASH.search(head)
    message_id = found_id.group(1).decode() if found_id else None
    intact = found_hash is not None and hashlib.sha256(body).hexdigest() == found_hash.group(1).decode()
    return Checked(message_id, intact)


# -- the sink ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    message_id: str | None
    recipients: tuple[str, ...]
    intact: bool
    epoch: int
    at: float


class RecordingSink(SinkServer):
    """A SinkServer that keeps a :class:`Delivery` per accepted message (not the bytes)."""

    def __init__(self, config: SinkConfig | None = None) -> None:
        super().__init__(config or SinkConfig(keep_messages=False, starttls="off", timeout=60.0))
        self.deliveries: list[Delivery] = []
        self.epoch = 0
        # The epoch a connection was accepted in. A delivery is labelled with its connection's epoch,
        # not the epoch when the sink got round to the final dot: a relay killed right after sending
        # the dot has still delivered in the earlier epoch (its body was sent after our greeting, so
        # after this accept), even when this process reads the dot after the killer moved the epoch on.
        self._connection_epochs: dict[int, int] = {}

    def _new_session(self) -> _SinkSession:
        session = super()._new_session()
        self._connection_epochs[session.connection] = self.epoch
        return session

    async def _accept(self, message: ReceivedMessage) -> str | None:
        failure = await super()._accept(message)
        if failure is None:
            checked = check_message(message.data)
            epoch = self._connection_epochs.get(message.connection, self.epoch)
            self.deliveries.append(Delivery(checked.message_id, tuple(message.rcpt_tos), checked.intact,
                                            epoch, time.monotonic()))
        return failure


# -- the relay as a process -------------------------------------------------------------------------------

@dataclass
class RelayConfig:
    """What :func:`relay_config` needs; the rest of relay.toml keeps what the drivers need."""

    workdir: Path
    store_url: str
    port: int
    sink_port: int
    lease_seconds: float = 5.0
    retry_schedule: str = "1s, 2s, 3s*"
    command_timeout: float = 30.0
    redis_url: str = ""
    fail_open: bool = True
    max_connections: int = 1000
    connections_per_ip: int = 0
    starttls: bool = False                 # on the relay listener, with the relay's development certificate
    more_listeners: str = ""               # [[listeners]] tables appended after the relay listener
    extra: str = ""                        # more TOML appended verbatim at the end
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))


def relay_config(config: RelayConfig) -> Path:
    """Write relay.toml for a subprocess relay; returns its path."""
    register_secret(config.secret_key)
    register_secret(config.admin_token)
    path = config.workdir / "relay.toml"
    path.write_text(f"""
[server]
hostname = "relay.reliability.test"
state_dir = {json.dumps(str(config.workdir / "state"))}
role = "all"
secret_key = {json.dumps(config.secret_key)}
admin_token = {json.dumps(config.admin_token)}

[store]
url = {json.dumps(config.store_url)}
pool_size = 8

[redis]
url = {json.dumps(config.redis_url)}
fail_open = {json.dumps(config.fail_open)}
timeout = 0.5

[tls]
dev_certificate = {json.dumps(config.starttls or "starttls = true" in config.more_listeners)}

[smtp]
command_timeout = {config.command_timeout}
data_timeout = {config.command_timeout}

[limits]
connections_per_ip = {config.connections_per_ip}
connection_rate_per_ip = {{ count = 0, period = 60 }}

[log]
level = "info"
format = "json"

[[listeners]]
name = "relay"
address = "127.0.0.1:{config.port}"
kind = "relay"
auth = "optional"
trusted_networks = ["127.0.0.0/8"]
starttls = {json.dumps(config.starttls)}
max_connections = {config.max_connections}
{config.more_listeners}

[delivery]
lease_seconds = {config.lease_seconds}
idle_timeout = 1.0

[delivery.retry]
schedule = {json.dumps(config.retry_schedule)}

[delivery.routes]
default = {{ kind = "host", host = "127.0.0.1", port = {config.sink_port}, tls = "none" }}
{config.extra}
""")
    path.chmod(0o600)
    return path


class RelayProcess:
    """``relay serve`` as a child process: start, wait until it accepts, SIGKILL or stop, by PID."""

    def __init__(self, config_path: Path, port: int, log_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.log_dir = log_dir
        self.env = {**os.environ, **(env or {})}
        self.incarnation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_files: list[Path] = []
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.incarnation += 1
        path = self.log_dir / f"relay-{self.incarnation:04d}.log"
        self.log_files.append(path)
        self._close_log()
        self._log = open(path, "wb")  # noqa: SIM115 - closed when the process is gone
        with contextlib.suppress(RuntimeError):
            from tests.support.logtap import current_tap
            current_tap().add_file(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "--config", str(self.config_path), "serve"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the listener answers with a 220 greeting (the store is open by then)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode} before it was ready; "
                                   f"log: {self.log_files[-1]}: {self.tail()}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2)
                try:
                    greeting = await asyncio.wait_for(reader.readline(), 5)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                if greeting.startswith(b"220 "):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay not ready after {timeout}s; log: {self.tail()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL by PID and reap it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        # Its log file too: left to the garbage collector, it was closed with a ResourceWarning in
        # whichever later test happened to trigger a collection (and failed that test).
        self._close_log()

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM by PID (a graceful stop) and wait; SIGKILL if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return self.proc.returncode if self.proc is not None else 0
        os.kill(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.kill()
            self._close_log()
            raise TimeoutError("relay did not stop on SIGTERM")
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        if not self.log_files or not self.log_files[-1].exists():
            return ""
        return "\n".join(self.log_files[-1].read_text(errors="replace").splitlines()[-lines:])

    def log_lines(self) -> Iterable[str]:
        for path in self.log_files:
            if path.exists():
                yield from path.read_text(errors="replace").splitlines()


# -- reading the relay's JSON log -------------------------------------------------------------------------

#: Events that mean an unhandled exception in the relay.
CRASH_EVENTS = frozenset({"session_crashed", "command_failed", "delivery_job_crashed", "delivery_task_crashed",
                          "delivery_loop_error", "delivery_routing_crashed", "enqueue_batch_crashed",
                          "store_writer_died", "delivery_after_attempt_crashed"})


def log_problems(lines: Iterable[str], *, allowed_errors: frozenset[str] = frozenset()) -> list[str]:
    """Lines that show a crash: a crash event, a traceback, a line that is not JSON, or level error/critical
    — unless its event starts with one of ``allowed_errors``: what a fault the test injects on purpose makes
    the relay (or a library) log; a store outage makes the delivery loop log its error with a traceback."""
    problems = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            problems.append(line)    # a traceback printed outside structlog, or garbage
            continue
        event = str(record.get("event", ""))
        level = str(record.get("level", ""))
        crashed = event in CRASH_EVENTS or "exception" in record or "Traceback" in line
        if any(event.startswith(allowed) for allowed in allowed_errors):
            continue            # injected on purpose by the test that passes it
        if crashed or level in ("error", "critical"):
            problems.append(line)
    return problems


# -- submitting many messages -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outgoing:
    sender: str
    recipients: tuple[str, ...]
    data: bytes


#: What submit_all reports for a message whose final dot was written but never answered.
UNANSWERED = b"?"


async def submit_all(port: int, messages: list[Outgoing], clients: int = 8, per_connection: int = 50) -> list[bytes]:
    """Submit every message over ``clients`` concurrent pipelining connections; the final reply line of each
    (in the order given): the reply to the final dot, an envelope refusal, :data:`UNANSWERED` when the
    connection died after the dot was written, or ``b""`` when it died before (the relay cannot have the
    message). A connection carries ``per_connection`` messages, then QUITs; a lost one is replaced."""
    replies: list[bytes] = [b""] * len(messages)
    todo = list(range(len(messages)))
    todo.reverse()

    async def client() -> None:
        while todo:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            try:
                await _final_line(reader)
                writer.write(b"EHLO submit.reliability.test\r\n")
                await _final_line(reader)
                for _ in range(per_connection):
                    if not todo:
                        break
                    index = todo.pop()
                    replies[index] = await _one(reader, writer, messages[index])
                writer.write(b"QUIT\r\n")
                await _final_line(reader)
            except (ConnectionError, OSError, TimeoutError):
                pass                 # the message in progress says how far it got; the rest go on
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    await asyncio.gather(*(client() for _ in range(clients)))
    return replies


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: Outgoing) -> bytes:
    commands = [f"MAIL FROM:<{message.sender}>\r\n".encode()]
    commands += [f"RCPT TO:<{r}>\r\n".encode() for r in message.recipients]
    commands.append(b"DATA\r\n")
    writer.write(b"".join(commands))
    replies = [await _final_line(reader) for _ in commands]
    if not replies[-1].startswith(b"354"):
        return replies[-1]
    writer.write(dot_stuffed(message.data))
    try:
        return await _final_line(reader)
    except (ConnectionError, OSError, TimeoutError):
        return UNANSWERED


async def _final_line(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 60)
        if not line:
            raise ConnectionError("the relay closed the connection")
        if line[3:4] != b"-":
            return line
