"""Hostile SMTP input: hypothesis drives random and mutated sessions against a real relay process.

:func:`run_fuzz` (CI: ``tests/reliability/test_fuzz.py``; on demand: ``scripts/reliability --fuzz N``)
starts ``relay serve`` (uvloop, JSON logs to a file) with two listeners — "relay" (trusted loopback,
STARTTLS) and "submission" (AUTH required, allowed in clear text to loopback so that AUTH garbage reaches
the AUTH code without a TLS handshake) — a sink it delivers to, and a user whose password the sessions
sometimes know. Then:

- ``sessions`` sessions drawn by hypothesis (:func:`sessions`): random command soup (every verb, valid
  and hostile arguments, huge lines, NUL bytes, invalid UTF-8, bare CR/LF), mutations of a valid
  transaction (bytes deleted, inserted, replaced, duplicated, line ends swapped), DATA with smuggling
  sequences, AUTH garbage, STARTTLS then plain text; each sent as one pipelined burst or piece by piece.
  A session ends with the client half-closing its side; the relay must answer what it has and close.
- a few slowloris clients (one byte every half second, never a whole line) run alongside; each must be
  cut off with ``421 4.4.2`` by the (short) command timeout while the others are served.

Checked (:meth:`FuzzReport.failures`): the relay process never dies; every session ends (the relay
closes the connection) within a bound; every reply line is well formed — three digits, then a space
or a dash, CRLF, at most 512 octets, the same code on every line of a reply, and an RFC 3463 enhanced
code of the same class on replies other than the greeting, EHLO/HELO, 334 and 354; the relay's log has
no crash event, traceback or error line; its RSS after the run is within :data:`RSS_MARGIN` of the RSS
after warm-up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.reliability.harness import RecordingSink, RelayConfig, RelayProcess, free_port, log_problems, relay_config
from tests.support.logtap import register_secret

HOSTNAME = b"relay.reliability.test"
USER = "fuzzuser"
PASSWORD = "fuzz-pass-Q7c2x9Lw"
COMMAND_TIMEOUT = 2.0
#: Allowed RSS growth between warm-up and the end of the run.
RSS_MARGIN = 0.20
#: A session must be over (the relay closed the connection) this long after the client stopped sending.
SESSION_BOUND = 30.0
SLOWLORIS_CLIENTS = 4
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)\r\n$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")


# -- what a session sends ----------------------------------------------------------------------------------

VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"EXPN",
         b"HELP", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"BDAT", b"ETRN", b"XCLIENT",
         b"mail from:", b"rcpt to:", b"ehlo", b"Data", b"MAIL", b"RCPT", b"AUTH"]
ADDRESSES = [b"<a@example.org>", b"<>", b"<b@example.com>", b"<user%evil.example@relay.reliability.test>",
             b"<@a.example,@b.example:c@d.example>", b"<\"quoted local\"@example.com>", b"<evil!host!user>",
             b"<x@[127.0.0.1]>", b"<x@[IPv6:::1]>", b"<a@b@c>", b"<" + b"a" * 300 + b"@example.com>",
             b"<\xc3\xa9l\xc3\xa8ve@\xc3\xa9cole.example>", b"<a@example.org> SIZE=99999999999",
             b"<a@example.org> BODY=8BITMIME SMTPUTF8", b"<a@example.org> RET=FULL ENVID=abc+2Bdef",
             b"<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40example.com", b"<a@example.org> AUTH=<>",
             b"a@example.org", b"<a@example.org", b"<\x00@example.org>", b"<a@-bad-.example>", b"<a@.>"]
ARGUMENTS = [b"", b" ", b"client.example", b"[127.0.0.1]", b"\xff\xfe", b"x" * 2000, b"=?utf-8?q?x?=",
             b"*", b"=", b"AGZ1enp1c2VyAHdyb25n", base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()),
             base64.b64encode(b"\0\0"), b"!!notbase64!!", base64.b64encode(b"\xff\xfe\xfd"),
             base64.b64encode(USER.encode()), base64.b64encode(PASSWORD.encode()), b"FULL", b"HDRS"]
LINE_ENDS = [b"\r\n"] * 6 + [b"\n", b"\r", b"", b"\r\r\n", b"\n\r"]
SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r", b"\r\n\x00.\r\n",
             b".\r\n", b"\r\n.\r\n", b"\r\n..\r\n", b"\r\n.\r\n.\r\n"]
MIME_PIECES = [
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n",
    b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/html\r\n\r\n",
    b"--b1\r\nContent-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
    b"--b1\r\nContent-Transfer-Encoding: base64\r\nContent-Type: text/html\r\n\r\n"
    b"PGEgaHJlZj0iaHR0cDovL3guZXhhbXBsZSI+\r\n",
    b"--b1--\r\n", b"--b1\r\n", b"Content-Type: multipart/mixed; boundary=\r\n\r\n",
    b'<a href="https://shop.example/?a=1&amp;b=2">x</a>\r\n', b"<a href='http://x.example/\r\n'>",
    b'<a href="https://x.example/&#13;&#10;Set-Cookie: y">', b"<img src=x onerror=1><a href=>\r\n",
    b"<!--", b"<![CDATA[", b"<a href=\"javascript:alert(1)\">", b"=3D=\r\n=E9=\r\n", b"\xc3\x28\xa0\xa1",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=x; s=y; b=\r\n", b"X-Relay-Track: no\r\n",
    b"List-Unsubscribe: <https://u.example/x>\r\n", b"From: =?utf-8?b?w6k=?= <a@example.org>\r\n",
]
VALID = (b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
         b"Subject: fuzz\r\nFrom: <a@example.org>\r\n\r\nbody line\r\n..dot line\r\n.\r\nQUIT\r\n")


@dataclass(frozen=True)
class Session:
    listener: str                # "relay" or "submission"
    chunks: tuple[bytes, ...]
    burst: bool                  # everything in one write, or chunk by chunk


def _command() -> st.SearchStrategy[bytes]:
    argument = st.one_of(st.sampled_from(ADDRESSES), st.sampled_from(ARGUMENTS), st.binary(max_size=80),
                         st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))
    return st.builds(lambda verb, sep, arg, end: verb + sep + arg + end, st.sampled_from(VERBS),
                     st.sampled_from([b" ", b"", b"  ", b"\t"]), argument, st.sampled_from(LINE_ENDS))


def _data_body() -> st.SearchStrategy[bytes]:
    piece = st.one_of(st.sampled_from(SMUGGLING), st.binary(max_size=200), st.sampled_from(MIME_PIECES),
                      st.sampled_from([b"Subject: x\r\n", b"\r\n", b"..\r\n", b"Received: x\r\n" * 60,
                                       b"From: <a@elsewhere.example>\r\n", b"A" * 5000 + b"\r\n"]))
    return st.lists(piece, max_size=12).map(b"".join)


def _huge_line() -> st.SearchStrategy[bytes]:
    return st.builds(lambda n, c, end: c * n + end, st.integers(900, 200_000),
                     st.sampled_from([b"A", b"\x00", b"\xff", b" ", b"MAIL FROM:<"]), st.sampled_from(LINE_ENDS))


def _mutated_valid() -> st.SearchStrategy[bytes]:
    def mutate(data: bytes, edits: list[tuple[int, int, int, bytes]]) -> bytes:
        out = bytearray(data)
        for kind, at, length, blob in edits:
            pos = at % (len(out) + 1)
            if kind == 0:
                del out[pos:pos + length]
            elif kind == 1:
                out[pos:pos] = blob
            elif kind == 2:
                out[pos:pos + len(blob)] = blob
            elif kind == 3:
                out[pos:pos] = bytes(out[pos:pos + length]) * 3
            else:
                out[:] = bytes(out).replace(b"\r\n", b"\n", 1 + length % 3)
        return bytes(out)

    edit = st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 40), st.binary(min_size=1, max_size=12))
    return st.builds(mutate, st.just(VALID), st.lists(edit, min_size=1, max_size=6))


def _transaction() -> st.SearchStrategy[list[bytes]]:
    """A well-formed envelope around a hostile body (reaches the accept path and the queue)."""
    return st.builds(lambda helo, sender, rcpts, body, end: [
        b"EHLO " + helo + b"\r\n", b"MAIL FROM:" + sender + b"\r\n",
        *[b"RCPT TO:" + r + b"\r\n" for r in rcpts], b"DATA\r\n", body, end, b"QUIT\r\n"],
        st.sampled_from([b"client.example", b"[127.0.0.1]", b"x" * 300]),
        st.sampled_from(ADDRESSES[:4]), st.lists(st.sampled_from(ADDRESSES[:8]), min_size=1, max_size=4),
        _data_body(), st.sampled_from([b"\r\n.\r\n", b".\r\n", b"", b"\n.\n"]))


def _auth() -> st.SearchStrategy[list[bytes]]:
    return st.builds(lambda mech, steps: [b"EHLO client.example\r\n", b"AUTH " + mech + b"\r\n",
                                          *[s + b"\r\n" for s in steps], b"MAIL FROM:<a@example.org>\r\n"],
                     st.sampled_from([b"PLAIN", b"LOGIN", b"PLAIN " + ARGUMENTS[10], b"LOGIN " + ARGUMENTS[14],
                                      b"XOAUTH2", b"PLAIN =", b"plain " + ARGUMENTS[9]]),
                     st.lists(st.one_of(st.sampled_from(ARGUMENTS), st.binary(max_size=60)), max_size=4))


@st.composite
def sessions(draw: Callable[..., Any]) -> Session:
    kind = draw(st.sampled_from(["soup", "mutated", "transaction", "auth", "huge", "starttls"]))
    if kind == "soup":
        chunks = draw(st.lists(st.one_of(_command(), _command(), st.binary(max_size=100)), min_size=1, max_size=25))
    elif kind == "mutated":
        chunks = [draw(_mutated_valid())]
    elif kind == "transaction":
        chunks = draw(_transaction())
    elif kind == "auth":
        chunks = draw(_auth())
    elif kind == "huge":
        chunks = [b"EHLO client.example\r\n", draw(_huge_line()), b"NOOP\r\n"]
    else:
        # STARTTLS, then whatever a confused client sends in clear text (a failed handshake), or twice.
        chunks = [b"EHLO client.example\r\n", b"STARTTLS\r\n",
                  draw(st.sampled_from([b"STARTTLS\r\n", b"EHLO again\r\n", b"\x16\x03\x01\x00\x05hello"]))]
    listener = draw(st.sampled_from(["relay", "submission"]))
    return Session(listener, tuple(chunks), draw(st.booleans()))


# -- running sessions and reading replies ----------------------------------------------------------------

@dataclass
class FuzzReport:
    sessions: int = 0
    bytes_sent: int = 0
    replies: int = 0
    malformed: list[str] = field(default_factory=list)
    unfinished: int = 0
    relay_died: bool = False
    log_problems: list[str] = field(default_factory=list)
    slowloris_cut: int = 0
    slowloris_problems: list[str] = field(default_factory=list)
    rss_warm: int = 0
    rss_end: int = 0
    rss_samples: list[tuple[int, int]] = field(default_factory=list)   # (sessions so far, RSS) every tenth
    elapsed: float = 0.0

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_warm) / self.rss_warm if self.rss_warm else 0.0

    def failures(self) -> list[str]:
        found = []
        if self.relay_died:
            found.append("the relay process died")
        if self.malformed:
            found.append(f"{len(self.malformed)} malformed replies, first: {self.malformed[0]}")
        if self.unfinished:
            found.append(f"{self.unfinished} sessions the relay did not close within {SESSION_BOUND}s")
        if self.log_problems:
            found.append(f"{len(self.log_problems)} crash/error lines in the log, first: {self.log_problems[0][:600]}")
        if self.slowloris_problems:
            found.append("slowloris: " + "; ".join(self.slowloris_problems[:5]))
        if self.rss_growth > RSS_MARGIN:
            found.append(f"RSS grew {self.rss_growth:.0%} (from {self.rss_warm} to {self.rss_end} bytes)")
        return found

    def summary(self) -> str:
        return (f"sessions={self.sessions} bytes_sent={self.bytes_sent} replies={self.replies} "
                f"malformed={len(self.malformed)} unfinished={self.unfinished} relay_died={self.relay_died} "
                f"log_problems={len(self.log_problems)} slowloris_cut={self.slowloris_cut}/{SLOWLORIS_CLIENTS} "
                f"rss_warm={self.rss_warm / 2**20:.1f}MiB rss_end={self.rss_end / 2**20:.1f}MiB "
                f"growth={self.rss_growth:+.1%} elapsed={self.elapsed:.1f}s")


def reply_problems(raw: bytes) -> list[str]:
    """What is wrong with the relay's side of a session (its replies, as bytes); empty when all is well.

    The enhanced code is looked for on the first line of a reply (where the relay puts it)."""
    problems: list[str] = []
    lines = raw.split(b"\r\n")
    tail = lines.pop()
    if tail:
        problems.append(f"reply bytes not ended by CRLF: {tail[:80]!r}")
    reply_code: bytes | None = None
    first_text = b""                      # of the reply in progress (an EHLO reply starts with the host name)
    for bare in lines:
        line = bare + b"\r\n"
        match = _REPLY_LINE.match(line)
        if match is None or b"\r" in bare or b"\n" in bare:
            problems.append(f"malformed reply line {line[:120]!r}")
            reply_code = None
            continue
        if len(line) > 512:
            problems.append(f"reply line of {len(line)} octets: {line[:80]!r}")
        code, sep, text = match.groups()
        if reply_code is not None and code != reply_code:
            problems.append(f"code changed inside a multi-line reply: {line[:80]!r}")
        if reply_code is None:
            first_text = text
        reply_code = code if sep == b"-" else None
        if sep == b" ":
            problem = _enhanced_problem(code, first_text)
            if problem:
                problems.append(problem)
    return problems


def _enhanced_problem(code: bytes, text: bytes) -> str | None:
    if code in (b"220", b"334", b"354"):
        return None
    if code == b"250" and text.startswith(HOSTNAME):
        return None                      # an EHLO / HELO reply (its first line names the host)
    decoded = text.decode("utf-8", "replace")
    match = _ENHANCED.match(decoded)
    if match is None:
        return f"no enhanced status code in {code.decode()} {decoded[:80]!r}"
    if match.group(1) != code.decode()[0]:
        return f"enhanced code class differs from the reply code: {code.decode()} {decoded[:80]!r}"
    return None


async def run_session(port: int, session: Session) -> tuple[bytes, bool]:
    """Send the session, half-close, read until the relay closes; (everything it sent, closed in time)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    received = bytearray()

    async def read_all() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    reading = asyncio.create_task(read_all())
    try:
        with contextlib.suppress(OSError):
            if session.burst:
                writer.write(b"".join(session.chunks))
            else:
                for chunk in session.chunks:
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        try:
            await asyncio.wait_for(asyncio.shield(reading), SESSION_BOUND)
            closed = True
        except TimeoutError:
            closed = False
        except OSError:
            closed = True               # reset by the relay: it closed, possibly with data unread
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return bytes(received), closed


async def slowloris(port: int, report: FuzzReport) -> None:
    """One byte every half second, never a whole line: must end with 421 4.4.2 and a close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        received += await asyncio.wait_for(reader.readline(), 10)
        deadline = time.monotonic() + COMMAND_TIMEOUT * 15
        for byte in (b"EHLO slow.client.example " * 200):
            with contextlib.suppress(OSError):
                writer.write(bytes([byte]))
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 0.5)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                received += chunk
            if time.monotonic() > deadline:
                report.slowloris_problems.append("still connected long after the command timeout")
                return
        if b"421 4.4.2" not in received:
            report.slowloris_problems.append(f"cut off without 421 4.4.2: {bytes(received[-120:])!r}")
        else:
            report.slowloris_cut += 1
    except ConnectionResetError:
        # Cut off: the relay closed with our latest bytes unread, so its kernel answered them with a reset,
        # which may overtake the 421 in our receive buffer. Cut off all the same.
        report.slowloris_cut += 1
    except OSError as exc:
        report.slowloris_problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


# -- the whole run ----------------------------------------------------------------------------------------

def _dkim_key(workdir: Path) -> Path:
    import subprocess
    import sys

    from tests.reliability.harness import REPO
    subprocess.run([sys.executable, "-m", "relay.cli", "dkim", "keygen", "--domain", "example.org", "--selector",
                    "fuzz", "--algorithm", "ed25519", "--out", str(workdir)], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    [key] = workdir.glob("example.org.fuzz*.pem")
    return key


def _fuzz_config(workdir: Path, sink_port: int) -> tuple[Path, dict[str, int]]:
    """Two listeners, and the plugins that look into messages (suppression list, tracking's HTML and MIME
    rewrite at DATA, DKIM signing before each delivery attempt) so hostile messages reach them too."""
    ports = {"relay": free_port(), "submission": free_port()}
    key = _dkim_key(workdir)
    plugins = f"""
[http]
public_url = "https://t.fuzz.example"

[chain]
plugins = ["blacklist", "tracking", "dkim"]

[plugins.tracking]
enabled_for_domains = ["*"]
enabled_for_users = ["*"]
one_click_unsubscribe = true

[plugins.dkim]
domains = {{ "example.org" = [{{ selector = "fuzz", algorithm = "ed25519-sha256", key_file = "{key}" }}] }}
default_domain = "example.org"
"""
    submission = f"""
[[listeners]]
name = "submission"
address = "127.0.0.1:{ports['submission']}"
kind = "submission"
auth = "required"
trusted_networks = []
allow_plain_auth_on_loopback = true
starttls = true
"""
    config = RelayConfig(workdir=workdir, store_url=f"sqlite:///{workdir}/queue.db", port=ports["relay"],
                         sink_port=sink_port, command_timeout=COMMAND_TIMEOUT, starttls=True,
                         more_listeners=submission, extra=plugins)
    return relay_config(config), ports


def _add_user(config: Path) -> None:
    import subprocess
    import sys

    from tests.reliability.harness import REPO
    register_secret(PASSWORD)
    subprocess.run([sys.executable, "-m", "relay.cli", "--config", str(config), "users", "add", USER,
                    "--password-stdin"], input=PASSWORD + "\n", text=True, cwd=REPO, check=True,
                   capture_output=True, timeout=120)


def run_fuzz(sessions_wanted: int, workdir: Path, *, seed: int = 0, warmup: int | None = None) -> FuzzReport:
    """The whole run, on its own event loop (hypothesis calls the test function synchronously)."""
    report = FuzzReport()
    warmup_at = warmup if warmup is not None else max(200, sessions_wanted // 10)
    started = time.monotonic()
    with asyncio.Runner() as runner:
        sink = RecordingSink()
        runner.run(sink.start())
        config, ports = _fuzz_config(workdir, sink.port)
        _add_user(config)
        relay = RelayProcess(config, ports["relay"], workdir)
        relay.start()
        try:
            runner.run(relay.wait_ready())
            loris = [runner.get_loop().create_task(slowloris(ports["relay"], report))
                     for _ in range(SLOWLORIS_CLIENTS)]

            @settings(max_examples=sessions_wanted, deadline=None, database=None, derandomize=False,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                      print_blob=True)
            @given(session=sessions())
            def one_session(session: Session) -> None:
                raw, closed = runner.run(run_session(ports[session.listener], session))
                report.sessions += 1
                report.bytes_sent += sum(len(c) for c in session.chunks)
                report.replies += raw.count(b"\r\n")
                if not closed:
                    report.unfinished += 1
                problems = reply_problems(raw)
                report.malformed.extend(f"{p} (session {session!r:.300})" for p in problems)
                if relay.proc is not None and relay.proc.poll() is not None:
                    report.relay_died = True
                if report.sessions == warmup_at:
                    report.rss_warm = rss(relay.pid)
                if report.sessions % max(1, sessions_wanted // 10) == 0:
                    report.rss_samples.append((report.sessions, rss(relay.pid)))
                assert closed and not problems and not report.relay_died, (problems, closed)

            try:
                _seeded(one_session, seed)()
            finally:
                runner.run(asyncio.wait(loris, timeout=COMMAND_TIMEOUT * 20))
                for task in loris:
                    task.cancel()
                if relay.proc is not None and relay.proc.poll() is None:
                    runner.run(asyncio.sleep(1.0))   # let the last sessions' memory go back
                    report.rss_end = rss(relay.pid)
                    if not report.rss_warm:
                        report.rss_warm = report.rss_end
                else:
                    report.relay_died = True
        finally:
            if relay.proc is not None and relay.proc.poll() is None:
                runner.run(relay.stop())
            runner.run(sink.stop())
    # Alerts are the relay reporting on the hostile traffic (bounce rates of the fuzzed recipients), on purpose.
    report.log_problems = log_problems(relay.log_lines(), allowed_errors=frozenset({"alert"}))
    report.elapsed = time.monotonic() - started
    return report


def _seeded(test: Callable[[], None], seed: int) -> Callable[[], None]:
    from hypothesis import seed as hypothesis_seed
    return hypothesis_seed(seed)(test) if seed else test
