"""Unit tests of the pure DATA reader: terminator, unstuffing, smuggling variants, limits, chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.data import DataOutcome, DataReader


def feed_all(reader: DataReader, data: bytes, step: int | None = None) -> DataOutcome:
    if step is None:
        return reader.feed(data)
    outcome = DataOutcome.PENDING
    for i in range(0, len(data), step):
        outcome = reader.feed(data[i:i + step])
        if outcome is not DataOutcome.PENDING:
            break
    return outcome


def stuff(message: bytes) -> bytes:
    """What a correct client sends for ``message`` (CRLF lines)."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 7, 64])
def test_simple_message_any_chunking(step: int | None) -> None:
    reader = DataReader(10_000)
    assert feed_all(reader, b"Subject: hi\r\n\r\nbody\r\n.\r\n", step) is DataOutcome.COMPLETE
    assert reader.message == b"Subject: hi\r\n\r\nbody\r\n"


def test_empty_message() -> None:
    reader = DataReader(100)
    assert reader.feed(b".\r\n") is DataOutcome.COMPLETE
    assert reader.message == b""


@pytest.mark.parametrize("step", [None, 1, 2, 3])
def test_dot_unstuffing(step: int | None) -> None:
    reader = DataReader(10_000)
    raw = b"..\r\n...x\r\nmid.dle\r\n..end\r\n.\r\n"
    assert feed_all(reader, raw, step) is DataOutcome.COMPLETE
    assert reader.message == b".\r\n..x\r\nmid.dle\r\n.end\r\n"


def test_unstuffed_dot_line_is_unstuffed_leniently() -> None:
    reader = DataReader(10_000)
    assert reader.feed(b".foo\r\nbar\r\n.\r\n") is DataOutcome.COMPLETE
    assert reader.message == b"foo\r\nbar\r\n"


@pytest.mark.parametrize("variant", [
    b"a\n.\nb\r\n", b"a\r.\rb\r\n", b"a\n.\r\nb\r\n", b"a\r\n.\nb\r\n", b"a\r\n.\rb\r\n", b"a\r.\r\nb\r\n",
])
def test_smuggling_variants_never_end_data(variant: bytes) -> None:
    reader = DataReader(10_000)
    outcome = reader.feed(b"Subject: x\r\n\r\n" + variant)
    # Never COMPLETE: the only end is CRLF.CRLF; the bare CR/LF refuses the message.
    assert outcome is DataOutcome.BARE_NEWLINE
    assert reader.message == b""


@pytest.mark.parametrize("data", [b"a\nb\r\n.\r\n", b"a\rb\r\n.\r\n", b"a\r\n\nb\r\n.\r\n", b"\n.\r\n"])
@pytest.mark.parametrize("step", [None, 1, 2])
def test_bare_newlines_refused(data: bytes, step: int | None) -> None:
    assert feed_all(DataReader(10_000), data, step) is DataOutcome.BARE_NEWLINE


def test_crlf_split_across_chunks_is_not_bare() -> None:
    reader = DataReader(10_000)
    assert reader.feed(b"line one\r") is DataOutcome.PENDING
    assert reader.feed(b"\nline two\r") is DataOutcome.PENDING
    assert reader.feed(b"\n.\r") is DataOutcome.PENDING
    assert reader.feed(b"\n") is DataOutcome.COMPLETE
    assert reader.message == b"line one\r\nline two\r\n"


def test_eight_bit_and_nul_data_kept_verbatim() -> None:
    body = "héllo wörld".encode() + b"\xff\x00\x80\r\n"
    reader = DataReader(10_000)
    assert reader.feed(body + b".\r\n") is DataOutcome.COMPLETE
    assert reader.message == body


def test_leftover_is_the_next_pipelined_command() -> None:
    reader = DataReader(10_000)
    assert reader.feed(b"x\r\n.\r\nQUIT\r\nNOOP\r\n") is DataOutcome.COMPLETE
    assert reader.message == b"x\r\n"
    assert reader.leftover == b"QUIT\r\nNOOP\r\n"


def test_size_limit_hit_mid_stream_keeps_reading_to_terminator() -> None:
    reader = DataReader(2048)
    chunk = b"x" * 998 + b"\r\n"
    outcome = DataOutcome.PENDING
    for _ in range(100):
        outcome = reader.feed(chunk)
        assert outcome is DataOutcome.PENDING
    # Memory stays bounded while discarding.
    assert len(reader._buf) < 4096
    assert reader.feed(b".\r\nQUIT\r\n") is DataOutcome.TOO_BIG
    assert reader.leftover == b"QUIT\r\n"


def test_size_limit_exact_boundary() -> None:
    body = b"a" * 98 + b"\r\n"   # 100 bytes
    assert DataReader(100).feed(body + b".\r\n") is DataOutcome.COMPLETE
    assert DataReader(99).feed(body + b".\r\n") is DataOutcome.TOO_BIG


def test_line_length_limit() -> None:
    ok = b"a" * 50 + b"\r\n" + b"b" * 10 + b"\r\n"
    assert DataReader(10_000, max_line_length=50).feed(ok + b".\r\n") is DataOutcome.COMPLETE
    long = b"a" * 51 + b"\r\n" + b"b" * 10 + b"\r\n"
    assert DataReader(10_000, max_line_length=50).feed(long + b".\r\n") is DataOutcome.LINE_TOO_LONG


def test_feeding_after_finish_is_an_error() -> None:
    reader = DataReader(100)
    reader.feed(b".\r\n")
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(line, max_size=30), cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20))
def test_roundtrip_any_message_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    message = b"".join(x + b"\r\n" for x in lines)
    wire = stuff(message[:-2]) + b"\r\n" if message else b""
    wire += b".\r\n"
    reader = DataReader(1_000_000)
    pos, outcome = 0, DataOutcome.PENDING
    for cut in [*cuts, len(wire)]:
        if pos >= len(wire):
            break
        outcome = reader.feed(wire[pos:pos + cut])
        pos += cut
    assert outcome is DataOutcome.COMPLETE
    assert reader.message == message
