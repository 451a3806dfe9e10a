"""Pure pieces of the accept path's bookkeeping: queue ids and the log lines' timestamps and redaction."""

from __future__ import annotations

import datetime
import io
import json
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import ids
from relay.log import _redact_secrets, _UtcStamper, configure_logging, get_logger, set_process_fields


def reference_queue_id(millis: int, rand: int) -> str:
    """The definition: 48 bits of milliseconds then 32 random bits, 5 bits per character, big end first."""
    value = ((millis & ((1 << 48) - 1)) << 32) | rand
    return "".join(ids._ALPHABET[(value >> (5 * n)) & 31] for n in reversed(range(16)))


@given(st.integers(0, (1 << 48) - 1), st.integers(0, (1 << 32) - 1))
def test_queue_ids_follow_their_definition(millis: int, rand: int) -> None:
    original = random.getrandbits
    random.getrandbits = lambda _bits: rand  # type: ignore[assignment]
    try:
        made = ids.new_queue_id(millis / 1000 + 0.0001)
    finally:
        random.getrandbits = original  # type: ignore[assignment]
    assert made == reference_queue_id(millis, rand)
    assert len(made) == 16 and set(made) <= set(ids._ALPHABET)


def test_queue_ids_sort_by_time_and_differ() -> None:
    made = [ids.new_queue_id(1_795_000_000 + n / 1000) for n in range(2000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


@pytest.mark.parametrize("now", [1_795_463_299.0, 1_795_463_299.5, 1_795_463_299.999_999_9, 0.25])
def test_timestamps_are_iso_utc_with_microseconds(monkeypatch: pytest.MonkeyPatch, now: float) -> None:
    monkeypatch.setattr(time, "time", lambda: now)
    stamp = _UtcStamper()(None, "info", {})["timestamp"]
    expected = datetime.datetime.fromtimestamp(now, datetime.UTC)
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-23T19:47:10.369525Z")
    parsed = datetime.datetime.fromisoformat(stamp.removesuffix("Z") + "+00:00")
    assert abs((parsed - expected).total_seconds()) < 2e-6


def test_timestamps_follow_the_clock_across_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    stamper = _UtcStamper()
    for now in (100.9, 101.1, 99.5, 3600.0):   # the cached second is replaced, also going backwards
        monkeypatch.setattr(time, "time", lambda now=now: now)
        stamp = stamper(None, "info", {})["timestamp"]
        assert stamp == datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_redaction_by_key_name_still_applies_to_every_line() -> None:
    event = _redact_secrets(None, "info", {"password": "p", "Auth_Data": "x", "api_key": "k", "user": "bob",
                                           "webhook_secret": "s", "size": 3})
    assert event == {"password": "[redacted]", "Auth_Data": "[redacted]", "api_key": "[redacted]",
                     "user": "bob", "webhook_secret": "[redacted]", "size": 3}


def test_a_line_is_one_write_with_its_process_fields() -> None:
    class Writes(io.StringIO):
        calls: list[str]

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    out = Writes()
    out.calls = []
    configure_logging("info", "json", stream=out)
    set_process_fields(worker=3)
    try:
        get_logger("relay.test").info("hello", password="never", n=1)
    finally:
        set_process_fields()   # (tests/conftest.py puts the suite's log tap back after the test)
    [line] = out.calls                   # the text and its newline in one write: no interleaving
    assert line.endswith("\n")
    record = json.loads(line)
    assert (record["event"], record["worker"], record["password"], record["n"]) == ("hello", 3, "[redacted]", 1)
