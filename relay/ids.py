"""Queue ids: short, unique across relay nodes, and sortable by reception time.

An id is 16 characters of lowercase Crockford-style base32: 48 bits of milliseconds since the epoch and
32 random bits. Sorting ids sorts messages by reception (to the millisecond), which keeps queue
listings and the database's index locality friendly; the random part makes collisions between nodes
negligible. Ids are not secrets and must never be used as such.
"""

from __future__ import annotations

import random
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
# Every 10-bit value as its two characters: an id is 8 lookups, not 16 (ids are made on every message).
_PAIRS = tuple(_ALPHABET[n >> 5] + _ALPHABET[n & 31] for n in range(1024))


def new_queue_id(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    # Uniqueness, not secrecy: the process-wide Mersenne generator (seeded from the OS, reseeded in
    # forked children) costs a fraction of an os.urandom call per id.
    value = (millis << 32) | random.getrandbits(32)
    pairs = _PAIRS
    return "".join([pairs[(value >> shift) & 1023] for shift in (70, 60, 50, 40, 30, 20, 10, 0)])
