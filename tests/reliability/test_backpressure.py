"""Destination rates and the backlog cap that keeps a slow destination from starving the others.

The end-to-end property (a healthy destination keeps its rate next to a tarpit with a large backlog) is
tests/reliability/test_faults.py; these are the pieces it rests on.
"""

from __future__ import annotations

from relay.policies.routing import Route

from relay.delivery.destinations import CircuitBreaker, Destination


def destination() -> Destination:
    return Destination(("host", 25, "none", None, "x.example"), Route("host", host="x.example", tls="none"), [],
                       CircuitBreaker(5, 300, 3600))


def test_nothing_known_means_no_rate() -> None:
    assert destination().rate(100.0, 10) is None


def test_fast_jobs_give_a_high_rate_and_slow_ones_a_low_one() -> None:
    fast, slow = destination(), destination()
    for n in range(20):
        fast.job_started(100.0 + n * 0.01, 1)
        fast.job_finished(100.0 + n * 0.01, 100.0 + n * 0.01 + 0.01, 1)
        slow.job_started(100.0 + n, 1)
        slow.job_finished(100.0 + n, 100.0 + n + 3.0, 1)
    fast_rate, slow_rate = fast.rate(101.0, 10), slow.rate(123.0, 10)
    assert fast_rate is not None and fast_rate >= 500
    assert slow_rate is not None and 3 <= slow_rate <= 4


def test_running_jobs_that_hang_lower_the_rate_before_any_finishes() -> None:
    tarpit = destination()
    for _ in range(10):
        tarpit.job_started(100.0, 1)
    early, later = tarpit.rate(100.5, 10), tarpit.rate(130.0, 10)
    assert early is not None and later is not None and later < early and later <= 10 / 30
    assert tarpit.running == 10 and len(tarpit.started) == 10
    tarpit.job_finished(100.0, 130.0, 1)
    assert tarpit.running == 9 and len(tarpit.started) == 9
