"""Structured logging for the whole relay (structlog over the standard library's root logger).

JSON lines when stderr is not a terminal (what operators tail and ship), a readable console renderer on
one. Context that belongs to a connection or a message (``conn_id``, ``client_ip``, ``auth_user``,
``queue_id``) is bound with :func:`bind_context` in contextvars, so every line logged while serving that
connection carries it without threading it through every call.

Libraries that log through the standard library (asyncpg's pool, aiosmtpd, aiohttp) are rendered by the
same processors, so every line on stderr is one JSON object — a library's traceback included (in its
``exception`` field), never raw text between the JSON lines. Their records below WARNING are dropped: the
relay's own lines say what happened at info level.

Invariant: nothing here ever renders a secret. Keys whose name says they hold one are replaced by
``"[redacted]"`` by :func:`_redact_secrets` as a last line of defence; callers must still never pass
passwords, AUTH payloads or keys.
"""

from __future__ import annotations

import datetime
import functools
import logging
import sys
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

_SECRET_WORDS = ("password", "passwd", "secret", "token", "auth_data", "private_key", "api_key")


@functools.lru_cache(maxsize=1024)
def _names_a_secret(key: str) -> bool:
    # Keys come from the code, a small set: memoised, since every line passes every key through here.
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in [key for key in event if _names_a_secret(key)]:
        event[key] = "[redacted]"
    return event


# Fields every line of this process carries (an SMTP worker's number): set once at start-up.
_process_fields: dict[str, Any] = {}


def set_process_fields(**values: Any) -> None:
    """Tag every line this process logs from now on (``worker=2`` in an SMTP worker process)."""
    _process_fields.clear()
    _process_fields.update(values)


def _add_process_fields(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _process_fields:
        for key, value in _process_fields.items():
            event.setdefault(key, value)
    return event


class _UtcStamper:
    """``timestamp``: ISO 8601 UTC with microseconds (``2026-11-23T19:47:10.369525Z``), as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes it, but with the date and time of the current second
    formatted once per second instead of on every line (two lines per message on the accept path).
    Thread-safe: the (second, text) pair is replaced as one tuple."""

    def __init__(self) -> None:
        self._cached: tuple[int, str] = (-1, "")

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        second, text = self._cached
        if int(now) != second:
            second = int(now)
            text = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, text)
        # Rounded to the nearest microsecond as datetime does; a value that rounds up to the next second stays
        # in this one (the text of the next second is not made here).
        event["timestamp"] = f"{text}.{min(round((now - second) * 1_000_000), 999_999):06d}Z"
        return event


def _foreign_logger_name(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event.get("_record")
    if record is not None:
        event.setdefault("logger_name", record.name)
    return event


class _StdlibHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """The handler configure_logging puts on the root logger (recognised, so a second call replaces it)."""


def _route_stdlib_logging(out: Any, renderer: Any) -> None:
    """Render standard-library log records (of libraries) as our lines on the same stream."""
    handler = _StdlibHandler(out)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            _foreign_logger_name,
            _add_process_fields,
            _UtcStamper(),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog once for the process; safe to call again (reload, tests)."""
    out = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not (hasattr(out, "isatty") and out.isatty()))
    renderer: Any = (structlog.processors.JSONRenderer() if as_json
                     else structlog.dev.ConsoleRenderer(colors=False))
    _route_stdlib_logging(out, renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_fields,
            structlog.processors.add_log_level,
            _UtcStamper(),
            _redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # WriteLogger: the line and its newline in one write() — SMTP worker processes share the stream,
        # and print()'s two writes let their lines interleave mid-line.
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger tagged with the module it logs for (lazy: it follows later configuration)."""
    # Not ``logger=name``: ``logger`` is wrap_logger's own parameter, so that call raised TypeError.
    return structlog.get_logger(logger_name=name)


@contextmanager
def bound_context(**values: Any) -> Iterator[None]:
    """Bind values to every line logged inside the block (in this task's context)."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def bind_context(**values: Any) -> None:
    """Bind values for the rest of the current task (a connection handler's lifetime)."""
    structlog.contextvars.bind_contextvars(**values)
