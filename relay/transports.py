"""Telling whether an object is a usable stream transport, on asyncio's own loop and on uvloop alike.

``relay serve`` runs on uvloop when it is installed. uvloop's transports (``uvloop.loop.TCPTransport``,
its TLS transport) implement asyncio's ``Transport`` interface without subclassing
``asyncio.Transport``, so ``isinstance(transport, asyncio.WriteTransport)`` is False for every one of
them. Code that guarded a write or a close with such a check silently did nothing under uvloop (an idle
client was never disconnected, the outbound client refused every connection it had just opened), while
the test suite, on asyncio's default loop, passed. This module checks the interface instead.

Invariant: :func:`stream_transport` returns the object itself (typed as ``asyncio.Transport``) when it
has every method relay calls on a stream transport, else None; it never looks at the class hierarchy.
"""

from __future__ import annotations

import asyncio
from typing import cast

_STREAM_METHODS = ("write", "close", "abort", "is_closing", "get_extra_info", "set_protocol", "get_protocol")


def stream_transport(obj: object) -> asyncio.Transport | None:
    """``obj`` as a stream transport when it is one (asyncio's or uvloop's), else None."""
    if obj is None:
        return None
    if isinstance(obj, asyncio.Transport) or all(callable(getattr(obj, name, None)) for name in _STREAM_METHODS):
        return cast(asyncio.Transport, obj)
    return None
