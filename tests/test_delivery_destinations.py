"""Pure logic of destinations: the circuit breaker's states, destination keys, job grouping."""

from __future__ import annotations

from relay.policies.routing import Route

from relay.delivery.destinations import CircuitBreaker, destination_key, destination_label, jobs_for
from relay.delivery.mx import MxHost
from relay.store.base import Claim, RecipientRow, RecipientState, StoredMessage


def breaker() -> CircuitBreaker:
    return CircuitBreaker(failures_to_open=3, open_for=60, max_open=200)


def test_breaker_opens_after_consecutive_failures_only() -> None:
    cb = breaker()
    assert not cb.record_failure(0) and not cb.record_failure(1)
    cb.record_success()  # a success in between starts the count again
    assert not cb.record_failure(2) and not cb.record_failure(3)
    assert cb.record_failure(4)
    assert cb.is_open(5) and cb.open_until == 64


def test_breaker_probe_failure_doubles_the_pause_up_to_the_cap() -> None:
    cb = breaker()
    for t in range(3):
        cb.record_failure(t)
    pauses = []
    now = 2.0
    for _ in range(4):
        now = cb.open_until + 1
        assert not cb.is_open(now)  # the pause is over: the next attempt is a probe
        assert cb.record_failure(now)  # one failed probe re-opens at once
        pauses.append(cb.current_open)
    assert pauses == [120, 200, 200, 200]


def test_breaker_probe_success_closes_it() -> None:
    cb = breaker()
    for t in range(3):
        cb.record_failure(t)
    assert not cb.is_open(cb.open_until + 1)
    assert cb.record_success()
    assert not cb.is_open(1000)
    assert not cb.record_failure(1000) and not cb.record_failure(1001)  # back to counting from zero
    assert not cb.record_success()  # nothing was open


def test_domains_with_the_same_mx_set_share_a_destination() -> None:
    route = Route("mx")
    a = [MxHost("mx2.example", 20, ("192.0.2.2",)), MxHost("mx1.example", 10, ("192.0.2.1",))]
    b = [MxHost("mx1.example", 10, ("192.0.2.9",)), MxHost("mx2.example", 20, ("192.0.2.2",))]
    assert destination_key(route, a) == destination_key(route, b)
    assert destination_key(route, a) != destination_key(Route("mx", tls="required"), a)
    assert destination_key(route, a) != destination_key(Route("mx", port=2525), a)
    assert destination_label(destination_key(route, a)) == "mx:10:mx1.example,20:mx2.example"


def _claim(rid: int, message_id: str) -> Claim:
    message = StoredMessage(message_id, "a@b.example", 10, 0.0, "", "", None, "", None, None, False)
    row = RecipientRow(rid, message_id, f"u{rid}@d.example", "d.example", RecipientState.QUEUED, 0, 0.0,
                       None, None, None, 0.0)
    return Claim(row, message, 100.0)


def test_jobs_group_by_message_and_split_by_size() -> None:
    claims = [_claim(1, "m1"), _claim(2, "m2"), _claim(3, "m1"), _claim(4, "m1")]
    jobs = jobs_for(claims, Route("mx"), max_recipients=2)
    assert [(job.message.id, job.recipient_ids) for job in jobs] == [("m1", [1, 3]), ("m1", [4]), ("m2", [2])]
