"""Outbound delivery: MX resolution (``mx``), the SMTP client (``client``), the scheduler that claims from
the queue and delivers (``scheduler``), DSN building (``dsn``) and the ``[delivery]`` settings (``config``).

Invariant: this package's ``__init__`` imports nothing, so ``relay.settings`` can import
``relay.delivery.config`` without pulling in the delivery machinery (or an import cycle).
"""
