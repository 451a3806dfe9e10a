"""Every log line the relay writes during the test run, and the secrets that must never be in one.

The suite configures structlog once, as production does (``relay.log.configure_logging``: JSON lines,
the redaction processor, level debug so that nothing is filtered away), with a :class:`LogTap` as the
stream. The tap appends every line to a file that lives for the whole session, forwards it to the
current ``sys.stderr`` (so pytest still shows a failing test's log) and hands it to any
:meth:`LogTap.watch` block in progress (the fuzz and fault tests read the lines of the relay they drive).
Relays run as subprocesses by the tests write their logs to files that are added with
:meth:`LogTap.add_file`.

Secrets: tests :func:`register_secret` every password, AUTH payload, key and token they use (the relay
fixture and the raw SMTP client do it for theirs). At the end of the session :func:`find_leaks` greps
every collected line for every registered secret; the session fixture in ``tests/conftest.py`` fails
the run if one is found.

Invariants: a secret shorter than :data:`MIN_SECRET_LENGTH` is not registered (``"p"`` would match
everything); the scan covers lines written before and after the secret was registered.
"""

from __future__ import annotations

import base64
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MIN_SECRET_LENGTH = 6

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | bytes | None, *, with_base64: bool = True) -> None:
    """Remember a secret the relay must never log (and, by default, its base64 form, as AUTH sends it)."""
    if value is None:
        return
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if len(text) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        _secrets.add(text)
        if with_base64:
            _secrets.add(base64.b64encode(text.encode()).decode())


def registered_secrets() -> frozenset[str]:
    with _secrets_lock:
        return frozenset(_secrets)


@dataclass(frozen=True)
class Leak:
    secret: str
    origin: str
    line: str

    def __str__(self) -> str:
        # The report must not spread the secret further: its first characters only, masked in the line.
        shown = self.secret[:3] + "…"
        masked = self.line.replace(self.secret, "[secret]")[:300]
        return f"secret {shown} (length {len(self.secret)}) in {self.origin}: {masked}"


def find_leaks(lines: Iterable[tuple[str, str]], secrets: Iterable[str]) -> list[Leak]:
    """Every (origin, line) that contains one of ``secrets`` (one regular expression for all of them: the
    run logs hundreds of thousands of lines)."""
    wanted = sorted(set(secrets), key=len, reverse=True)
    if not wanted:
        return []
    pattern = re.compile("|".join(re.escape(secret) for secret in wanted))
    leaks = []
    for origin, line in lines:
        found = pattern.search(line)
        if found is not None:
            leaks.append(Leak(found.group(0), origin, line.rstrip("\n")))
    return leaks


class LogTap:
    """A write-only text stream for structlog's WriteLogger; see the module docstring."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="relay-test-logs-"))
        self.path = self.directory / "in-process.jsonl"
        self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 - lives for the session
        self._lock = threading.Lock()
        self._watchers: list[Callable[[str], None]] = []
        self._files: list[Path] = []
        self.lines_written = 0

    # -- the stream side ----------------------------------------------------------------------------
    def write(self, text: str) -> int:
        with self._lock:
            self._file.write(text)
            if text.endswith("\n"):
                self.lines_written += 1
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher(text)
        sys.stderr.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def isatty(self) -> bool:
        return False

    # -- the test side ------------------------------------------------------------------------------
    @contextmanager
    def watch(self) -> Iterator[list[str]]:
        """Collect the lines written inside the block (the list fills as they are written)."""
        collected: list[str] = []

        def take(text: str) -> None:
            collected.extend(line for line in text.splitlines() if line)

        with self._lock:
            self._watchers.append(take)
        try:
            yield collected
        finally:
            with self._lock:
                self._watchers.remove(take)

    def add_file(self, path: Path) -> None:
        """A subprocess relay's log file, scanned with the rest at the end of the session."""
        with self._lock:
            self._files.append(Path(path))

    def all_lines(self) -> Iterator[tuple[str, str]]:
        """(origin, line) for every line collected so far, in-process first."""
        self.flush()
        with self._lock:
            files = [self.path, *self._files]
        for path in files:
            if not path.exists():
                continue
            with open(path, encoding="utf-8", errors="backslashreplace") as fh:
                for line in fh:
                    yield str(path.name), line

    def close(self) -> None:
        with self._lock:
            self._file.close()


_tap: LogTap | None = None


def install_tap(tap: LogTap) -> None:
    global _tap
    _tap = tap


def current_tap() -> LogTap:
    """The session's tap (set up by tests/conftest.py)."""
    if _tap is None:
        raise RuntimeError("the log tap is installed by tests/conftest.py at session start")
    return _tap
