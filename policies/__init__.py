"""Pure decision policies of outbound delivery (installed as ``relay.policies``).

Each module answers one question over plain values and keeps no state between calls:

- :mod:`relay.policies.bounce` — what does a remote reply (or a failure without one) mean: delivered,
  temporary or permanent, and which category (``invalid_recipient``, ``rate_limited``, …)? The shipped
  rules live in ``bounce_rules.toml`` next to it; admins add their own in ``relay.toml``.
- :mod:`relay.policies.retry` — when is the next attempt due, and when does a recipient expire?
- :mod:`relay.policies.routing` — how is mail for a domain sent: via its MX hosts, a fixed host, a
  smarthost, or refused?
- :mod:`relay.policies.addresses` — what is the one normal form of an address, a domain or an IP, so
  that a suppression matches every spelling of what it names?

Invariants: modules here import only the standard library (never ``relay`` core modules or plugins; the
one exception is the pure ``idna`` package in ``addresses``, because the standard library's codec is
IDNA 2003 and would name other domains than delivery uses), never do I/O beyond reading their own
package data once, and never raise on odd input from the network (a garbage reply is a value to
classify, not an exception). Configuration mistakes are the one thing
they raise for: :class:`ValueError` with a message naming the bad entry.
"""
