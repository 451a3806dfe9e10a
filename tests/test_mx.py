"""MxResolver against a real DNS server on loopback (tests/support/dnsserver.py).

Addresses used as "public" are global unicast addresses (the documentation blocks are not global, so
the resolver would drop them); nothing ever connects to them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay.delivery.mx import (
    DnsError,
    DnsPermanentError,
    DnsTemporaryError,
    MxHost,
    MxResolver,
    ascii_domain,
    is_public_address,
    parse_nameserver,
)
from tests.support.dnsserver import DnsTestServer

V4_1, V4_2, V4_3 = "1.2.3.4", "1.2.3.5", "1.2.3.6"
V6_1 = "2001:4860::1"
SOA = "ns.{z}. hostmaster.{z}. 1 3600 600 86400 {minimum}"


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsTestServer]:
    async with DnsTestServer() as server:
        yield server


def make_resolver(server: DnsTestServer, **options: object) -> MxResolver:
    settings: dict[str, object] = {"timeout": 0.5}
    settings.update(options)
    return MxResolver(nameservers=[server.nameserver], **settings)  # type: ignore[arg-type]  # test helper


def add_host(server: DnsTestServer, name: str, *addresses: str, ttl: int = 300) -> None:
    for address in addresses:
        server.add(name, "AAAA" if ":" in address else "A", address, ttl)


async def resolve_error(resolver: MxResolver, domain: str) -> DnsError:
    with pytest.raises(DnsError) as caught:
        await resolver.resolve(domain)
    return caught.value


# --- ordering and shape ---------------------------------------------------------------------------------


async def test_hosts_come_in_preference_order_with_both_families(dns_server: DnsTestServer) -> None:
    dns_server.add("example.org", "MX", "20 mx2.example.org.")
    dns_server.add("example.org", "MX", "10 mx1.example.org.")
    dns_server.add("example.org", "MX", "30 mx3.example.org.")
    add_host(dns_server, "mx1.example.org", V6_1, V4_1)
    add_host(dns_server, "mx2.example.org", V4_2)
    add_host(dns_server, "mx3.example.org", V4_3)

    hosts = await make_resolver(dns_server).resolve("example.org")

    assert hosts == [
        MxHost("mx1.example.org", 10, (V4_1, V6_1)),
        MxHost("mx2.example.org", 20, (V4_2,)),
        MxHost("mx3.example.org", 30, (V4_3,)),
    ]
    assert dns_server.query_count("mx1.example.org", "A") == 1
    assert dns_server.query_count("mx1.example.org", "AAAA") == 1


async def test_equal_preferences_are_shuffled(dns_server: DnsTestServer) -> None:
    dns_server.add_many("spread.example", "MX", ["10 a.spread.example.", "10 b.spread.example.",
                                                  "5 first.spread.example."])
    for host in ("a", "b", "first"):
        add_host(dns_server, f"{host}.spread.example", V4_1)
    resolver = make_resolver(dns_server)

    orders = set()
    for _ in range(60):  # both orders of a and b appear unless the shuffle is broken (p = 2**-59)
        hosts = await resolver.resolve("spread.example")
        assert hosts[0].name == "first.spread.example"
        orders.add(tuple(host.name for host in hosts[1:]))
    assert orders == {("a.spread.example", "b.spread.example"), ("b.spread.example", "a.spread.example")}


async def test_mx_host_behind_a_cname_is_resolved(dns_server: DnsTestServer) -> None:
    dns_server.add("alias.example", "MX", "10 mail.alias.example.")
    dns_server.add("mail.alias.example", "CNAME", "real.alias.example.")
    add_host(dns_server, "real.alias.example", V4_1)

    hosts = await make_resolver(dns_server).resolve("alias.example")

    assert hosts == [MxHost("mail.alias.example", 10, (V4_1,))]


async def test_max_hosts_caps_hosts_looked_up_and_returned(dns_server: DnsTestServer) -> None:
    dns_server.add_many("many.example", "MX", [f"{i} mx{i}.many.example." for i in range(1, 9)])
    for i in range(1, 9):
        add_host(dns_server, f"mx{i}.many.example", V4_1)

    hosts = await make_resolver(dns_server, max_hosts=3).resolve("many.example")

    assert [host.name for host in hosts] == ["mx1.many.example", "mx2.many.example", "mx3.many.example"]
    assert dns_server.query_count("mx4.many.example", "A") == 0
    assert dns_server.query_count("mx8.many.example", "AAAA") == 0


# --- RFC 5321 implicit MX and RFC 7505 null MX ---------------------------------------------------------


async def test_domain_without_mx_is_its_own_host(dns_server: DnsTestServer) -> None:
    add_host(dns_server, "implicit.example", V4_1, V6_1)

    hosts = await make_resolver(dns_server).resolve("implicit.example")

    assert hosts == [MxHost("implicit.example", 0, (V4_1, V6_1))]


async def test_null_mx_is_permanent_5_1_10(dns_server: DnsTestServer) -> None:
    dns_server.add("nomail.example", "MX", "0 .")
    add_host(dns_server, "nomail.example", V4_1)  # an address must not turn null MX into implicit MX

    error = await resolve_error(make_resolver(dns_server), "nomail.example")

    assert isinstance(error, DnsPermanentError)
    assert (error.code, error.enhanced, error.permanent) == (550, "5.1.10", True)
    assert "null MX" in error.text


async def test_root_exchange_among_real_mx_records_is_skipped(dns_server: DnsTestServer) -> None:
    dns_server.add_many("mixed.example", "MX", ["0 .", "10 mx.mixed.example."])
    add_host(dns_server, "mx.mixed.example", V4_1)

    hosts = await make_resolver(dns_server).resolve("mixed.example")

    assert hosts == [MxHost("mx.mixed.example", 10, (V4_1,))]


async def test_nxdomain_is_permanent_5_1_2(dns_server: DnsTestServer) -> None:
    error = await resolve_error(make_resolver(dns_server), "nowhere.example")

    assert isinstance(error, DnsPermanentError)
    assert (error.code, error.enhanced) == (550, "5.1.2")
    assert dns_server.query_count("nowhere.example", "MX") == 1


async def test_scripted_nxdomain_is_permanent_even_when_records_exist(dns_server: DnsTestServer) -> None:
    dns_server.add("gone.example", "MX", "10 mx.gone.example.")
    dns_server.behave("gone.example", "nxdomain")

    error = await resolve_error(make_resolver(dns_server), "gone.example")

    assert (error.permanent, error.enhanced) == (True, "5.1.2")


async def test_domain_with_neither_mx_nor_address_is_permanent(dns_server: DnsTestServer) -> None:
    dns_server.add("textonly.example", "TXT", '"v=spf1 -all"')

    error = await resolve_error(make_resolver(dns_server), "textonly.example")

    assert (error.permanent, error.code, error.enhanced) == (True, 550, "5.1.2")


# --- temporary failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["servfail", "refused", "timeout"])
async def test_server_failures_are_temporary_4_4_3(dns_server: DnsTestServer, behaviour: str) -> None:
    dns_server.add("flaky.example", "MX", "10 mx.flaky.example.")
    dns_server.behave("flaky.example", behaviour)  # type: ignore[arg-type]  # parametrized literal

    error = await resolve_error(make_resolver(dns_server, timeout=0.3), "flaky.example")

    assert isinstance(error, DnsTemporaryError)
    assert (error.code, error.enhanced, error.permanent) == (451, "4.4.3", False)


async def test_temporary_failures_are_not_cached(dns_server: DnsTestServer) -> None:
    dns_server.behave("flaky.example", "servfail")
    resolver = make_resolver(dns_server)

    await resolve_error(resolver, "flaky.example")
    await resolve_error(resolver, "flaky.example")

    assert dns_server.query_count("flaky.example", "MX") == 2


async def test_unreachable_nameserver_is_temporary() -> None:
    async with DnsTestServer() as server:
        nameserver = server.nameserver
    # Stopped: the port is closed (UDP gets ICMP unreachable or silence, TCP a refusal).
    resolver = MxResolver(nameservers=[nameserver], timeout=0.3)

    error = await resolve_error(resolver, "example.org")

    assert (error.permanent, error.enhanced) == (False, "4.4.3")


async def test_one_failing_mx_host_is_skipped(dns_server: DnsTestServer) -> None:
    dns_server.add_many("half.example", "MX", ["10 bad.half.example.", "20 good.half.example."])
    dns_server.behave("bad.half.example", "servfail")
    add_host(dns_server, "good.half.example", V4_1)

    hosts = await make_resolver(dns_server).resolve("half.example")

    assert hosts == [MxHost("good.half.example", 20, (V4_1,))]


async def test_all_mx_hosts_failing_is_temporary(dns_server: DnsTestServer) -> None:
    dns_server.add_many("down.example", "MX", ["10 a.down.example.", "20 b.down.example."])
    dns_server.behave("a.down.example", "servfail")
    dns_server.behave("b.down.example", "refused")

    error = await resolve_error(make_resolver(dns_server), "down.example")

    assert (error.permanent, error.code, error.enhanced) == (False, 451, "4.4.3")


async def test_one_family_failing_keeps_the_other(dns_server: DnsTestServer) -> None:
    dns_server.add("v4only.example", "MX", "10 mx.v4only.example.")
    add_host(dns_server, "mx.v4only.example", V4_1)
    dns_server.behave("mx.v4only.example", "servfail", rdtype="AAAA")

    hosts = await make_resolver(dns_server).resolve("v4only.example")

    assert hosts == [MxHost("mx.v4only.example", 10, (V4_1,))]


async def test_mx_hosts_that_do_not_exist_are_permanent_5_4_4(dns_server: DnsTestServer) -> None:
    dns_server.add_many("dangling.example", "MX", ["10 a.nowhere.example.", "20 b.nowhere.example."])

    error = await resolve_error(make_resolver(dns_server), "dangling.example")

    assert (error.permanent, error.code, error.enhanced) == (True, 550, "5.4.4")


# --- caching -------------------------------------------------------------------------------------------


async def test_answers_are_cached_within_their_ttl(dns_server: DnsTestServer) -> None:
    dns_server.add("cached.example", "MX", "10 mx.cached.example.", ttl=300)
    add_host(dns_server, "mx.cached.example", V4_1, V6_1, ttl=300)
    resolver = make_resolver(dns_server)

    first = await resolver.resolve("cached.example")
    hits_before = resolver.cache_hits
    second = await resolver.resolve("cached.example")

    assert first == second
    assert dns_server.query_count("cached.example", "MX") == 1
    assert dns_server.query_count("mx.cached.example", "A") == 1
    assert dns_server.query_count("mx.cached.example", "AAAA") == 1
    assert resolver.cache_hits == hits_before + 3
    assert resolver.cache_misses == 3


async def test_expired_answers_are_asked_again(dns_server: DnsTestServer) -> None:
    dns_server.add("short.example", "MX", "10 mx.short.example.", ttl=1)
    add_host(dns_server, "mx.short.example", V4_1, ttl=300)
    resolver = make_resolver(dns_server)

    await resolver.resolve("short.example")
    await asyncio.sleep(1.2)  # past the 1 s TTL (a wait, not a timed assertion)
    await resolver.resolve("short.example")

    assert dns_server.query_count("short.example", "MX") == 2
    assert dns_server.query_count("mx.short.example", "A") == 1  # its own, longer TTL


async def test_cache_ttl_is_the_smallest_in_the_chain(dns_server: DnsTestServer) -> None:
    dns_server.add("chain.example", "MX", "10 mail.chain.example.")
    dns_server.add("mail.chain.example", "CNAME", "real.chain.example.", ttl=1)
    add_host(dns_server, "real.chain.example", V4_1, ttl=300)
    resolver = make_resolver(dns_server)

    await resolver.resolve("chain.example")
    await asyncio.sleep(1.2)
    await resolver.resolve("chain.example")

    assert dns_server.query_count("mail.chain.example", "A") == 2
    assert dns_server.query_count("chain.example", "MX") == 1


async def test_negative_answers_are_cached_for_the_soa_minimum(dns_server: DnsTestServer) -> None:
    dns_server.add("neg.example", "SOA", SOA.format(z="neg.example", minimum=300))
    resolver = make_resolver(dns_server)

    await resolve_error(resolver, "missing.neg.example")
    error = await resolve_error(resolver, "missing.neg.example")

    assert error.enhanced == "5.1.2"
    assert dns_server.query_count("missing.neg.example", "MX") == 1


async def test_negative_answers_expire_with_a_short_soa_minimum(dns_server: DnsTestServer) -> None:
    dns_server.add("neg.example", "SOA", SOA.format(z="neg.example", minimum=1))
    resolver = make_resolver(dns_server)

    await resolve_error(resolver, "missing.neg.example")
    await asyncio.sleep(1.2)
    await resolve_error(resolver, "missing.neg.example")

    assert dns_server.query_count("missing.neg.example", "MX") == 2


async def test_negative_answers_without_soa_are_still_cached(dns_server: DnsTestServer) -> None:
    resolver = make_resolver(dns_server)

    await resolve_error(resolver, "nosoa.example")
    await resolve_error(resolver, "nosoa.example")

    assert dns_server.query_count("nosoa.example", "MX") == 1


async def test_nodata_is_cached_too(dns_server: DnsTestServer) -> None:
    dns_server.add("zone.example", "SOA", SOA.format(z="zone.example", minimum=300))
    add_host(dns_server, "web.zone.example", V4_1)
    resolver = make_resolver(dns_server)

    await resolver.resolve("web.zone.example")
    await resolver.resolve("web.zone.example")

    assert dns_server.query_count("web.zone.example", "MX") == 1
    assert dns_server.query_count("web.zone.example", "AAAA") == 1


async def test_cache_is_bounded_and_evicts_the_least_recently_used(dns_server: DnsTestServer) -> None:
    for zone in ("a.example", "b.example"):
        dns_server.add(zone, "MX", f"10 mx.{zone}.")
        add_host(dns_server, f"mx.{zone}", V4_1)
    resolver = make_resolver(dns_server, cache_max_entries=3)

    await resolver.resolve("a.example")  # MX, A, AAAA: the cache is full
    await resolver.resolve("b.example")  # evicts everything of a.example
    await resolver.resolve("b.example")
    await resolver.resolve("a.example")

    assert dns_server.query_count("b.example", "MX") == 1
    assert dns_server.query_count("a.example", "MX") == 2


async def test_concurrent_identical_lookups_share_one_query(dns_server: DnsTestServer) -> None:
    dns_server.add("busy.example", "MX", "10 mx.busy.example.")
    add_host(dns_server, "mx.busy.example", V4_1)
    resolver = make_resolver(dns_server)

    results = await asyncio.gather(*(resolver.resolve("busy.example") for _ in range(20)))

    assert all(hosts == results[0] for hosts in results)
    assert dns_server.query_count("busy.example", "MX") == 1
    assert dns_server.query_count("mx.busy.example", "A") == 1


# --- hostile answers -----------------------------------------------------------------------------------


async def test_cname_loop_on_the_domain_is_temporary(dns_server: DnsTestServer) -> None:
    dns_server.add_cname_loop("loop.example", "loop2.example")

    error = await resolve_error(make_resolver(dns_server), "loop.example")

    assert (error.permanent, error.enhanced) == (False, "4.4.3")


async def test_cname_loop_on_the_only_mx_host_is_temporary(dns_server: DnsTestServer) -> None:
    dns_server.add("looped.example", "MX", "10 mx.looped.example.")
    dns_server.add_cname_loop("mx.looped.example")

    error = await resolve_error(make_resolver(dns_server), "looped.example")

    assert (error.permanent, error.enhanced) == (False, "4.4.3")


async def test_huge_mx_answer_is_capped_and_fetched_over_tcp(dns_server: DnsTestServer) -> None:
    dns_server.add_many("huge.example", "MX", [f"{i} mx{i:03}.huge.example." for i in range(1, 401)])
    for i in range(1, 6):
        add_host(dns_server, f"mx{i:03}.huge.example", V4_1)

    hosts = await make_resolver(dns_server, max_hosts=5).resolve("huge.example")

    assert [host.preference for host in hosts] == [1, 2, 3, 4, 5]
    assert dns_server.tcp_queries >= 1  # the answer does not fit in UDP


async def test_huge_address_answer_is_handled(dns_server: DnsTestServer) -> None:
    dns_server.add("wide.example", "MX", "10 mx.wide.example.")
    addresses = [f"1.2.{i // 250}.{i % 250 + 1}" for i in range(600)]
    dns_server.add_many("mx.wide.example", "A", addresses)

    hosts = await make_resolver(dns_server).resolve("wide.example")

    assert len(hosts[0].addresses) == 600
    assert dns_server.tcp_queries >= 1


async def test_truncated_udp_answer_is_retried_over_tcp(dns_server: DnsTestServer) -> None:
    dns_server.add("tc.example", "MX", "10 mx.tc.example.")
    add_host(dns_server, "mx.tc.example", V4_1)
    dns_server.behave("tc.example", "truncate")

    hosts = await make_resolver(dns_server).resolve("tc.example")

    assert hosts == [MxHost("mx.tc.example", 10, (V4_1,))]
    assert dns_server.tcp_queries == 1
    assert dns_server.query_count("tc.example", "MX") == 2  # once over UDP, once over TCP


async def test_mx_names_that_are_ip_addresses_or_invalid_are_skipped(dns_server: DnsTestServer) -> None:
    dns_server.add_many("odd.example", "MX", ["5 1.2.3.4.", "6 bad_name.odd.example.",
                                               "7 x\\000y.odd.example.", "10 mx.odd.example."])
    add_host(dns_server, "mx.odd.example", V4_2)

    hosts = await make_resolver(dns_server).resolve("odd.example")

    assert hosts == [MxHost("mx.odd.example", 10, (V4_2,))]
    assert dns_server.query_count("1.2.3.4", "A") == 0


async def test_only_invalid_mx_names_is_permanent_5_4_4(dns_server: DnsTestServer) -> None:
    dns_server.add("iponly.example", "MX", "10 1.2.3.4.")

    error = await resolve_error(make_resolver(dns_server), "iponly.example")

    assert (error.permanent, error.enhanced) == (True, "5.4.4")


# --- address policy ------------------------------------------------------------------------------------


async def test_private_and_special_addresses_are_dropped_by_default(dns_server: DnsTestServer) -> None:
    dns_server.add("inside.example", "MX", "10 mx.inside.example.")
    add_host(dns_server, "mx.inside.example", "127.0.0.1", "10.1.2.3", "169.254.1.1", "0.0.0.0",
             "224.0.0.5", V4_1, "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", V6_1)

    hosts = await make_resolver(dns_server).resolve("inside.example")

    assert hosts == [MxHost("mx.inside.example", 10, (V4_1, V6_1))]


async def test_only_private_addresses_is_temporary_4_4_4(dns_server: DnsTestServer) -> None:
    dns_server.add("lan.example", "MX", "10 mx.lan.example.")
    add_host(dns_server, "mx.lan.example", "192.168.1.10", "127.0.0.1")

    error = await resolve_error(make_resolver(dns_server), "lan.example")

    assert isinstance(error, DnsTemporaryError)
    assert (error.code, error.enhanced) == (451, "4.4.4")


async def test_allow_private_keeps_private_addresses(dns_server: DnsTestServer) -> None:
    dns_server.add("lan.example", "MX", "10 mx.lan.example.")
    add_host(dns_server, "mx.lan.example", "192.168.1.10", "127.0.0.1")

    [host] = await make_resolver(dns_server, allow_private=True).resolve("lan.example")

    # Order inside one RRset carries no meaning (servers rotate it), so compare as a set.
    assert (host.name, host.preference) == ("mx.lan.example", 10)
    assert sorted(host.addresses) == ["127.0.0.1", "192.168.1.10"]


async def test_implicit_mx_with_only_loopback_is_temporary(dns_server: DnsTestServer) -> None:
    add_host(dns_server, "localhost.example", "127.0.0.1")

    error = await resolve_error(make_resolver(dns_server), "localhost.example")

    assert (error.permanent, error.enhanced) == (False, "4.4.4")


async def test_address_literals(dns_server: DnsTestServer) -> None:
    resolver = make_resolver(dns_server)

    assert await resolver.resolve("[1.2.3.4]") == [MxHost("[1.2.3.4]", 0, (V4_1,))]
    assert await resolver.resolve("[IPv6:2001:4860::1]") == [MxHost("[IPv6:2001:4860::1]", 0, (V6_1,))]
    assert (await resolve_error(resolver, "[127.0.0.1]")).enhanced == "4.4.4"
    assert (await resolve_error(resolver, "[300.1.1.1]")).enhanced == "5.1.2"
    assert await make_resolver(dns_server, allow_private=True).resolve("[127.0.0.1]") == [
        MxHost("[127.0.0.1]", 0, ("127.0.0.1",))]
    assert dns_server.udp_queries == 0


# --- domain input --------------------------------------------------------------------------------------


async def test_idna_domain_is_queried_as_a_labels(dns_server: DnsTestServer) -> None:
    dns_server.add("xn--bcher-kva.example", "MX", "10 mx.xn--bcher-kva.example.")
    add_host(dns_server, "mx.xn--bcher-kva.example", V4_1)
    resolver = make_resolver(dns_server)

    hosts = await resolver.resolve("Bücher.example")

    assert hosts == [MxHost("mx.xn--bcher-kva.example", 10, (V4_1,))]
    assert dns_server.query_count("xn--bcher-kva.example", "MX") == 1


@pytest.mark.parametrize("domain", [
    "", ".", "a..example", "-lead.example", "trail-.example", "under_score.example", "sp ace.example",
    "x" * 64 + ".example", ("a" * 60 + ".") * 5 + "example", "1.2.3.4", "semi;colon.example",
    "☃.example", "a\u200d.example", "nul\x00.example",
])
async def test_invalid_domains_are_permanent_5_1_2_without_a_query(
    dns_server: DnsTestServer, domain: str,
) -> None:
    error = await resolve_error(make_resolver(dns_server), domain)

    assert isinstance(error, DnsPermanentError)
    assert (error.code, error.enhanced) == (550, "5.1.2")
    assert dns_server.udp_queries == dns_server.tcp_queries == 0


def test_ascii_domain_normalises() -> None:
    assert ascii_domain("Example.ORG.") == "example.org"
    assert ascii_domain("straße.de") == "xn--strae-oqa.de"  # IDNA 2008: ß is kept, not mapped to ss


def test_public_address_policy() -> None:
    assert is_public_address(V4_1) and is_public_address(V6_1)
    for address in ("10.0.0.1", "172.16.0.1", "100.64.0.1", "127.0.0.2", "::", "ff02::1",
                    "::ffff:10.0.0.1", "255.255.255.255"):
        assert not is_public_address(address), address


def test_nameserver_entries() -> None:
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    for bad in ("dns.example", "127.0.0.1:0", "127.0.0.1:99999", "[::1", "1.2.3.4:x"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    with pytest.raises(ValueError):
        MxResolver(nameservers=["resolver.example"])


def test_error_classes_carry_the_reply() -> None:
    error = DnsTemporaryError(451, "4.4.3", "temporary DNS failure, will retry", "detail for the log")
    assert (error.code, error.enhanced, error.permanent) == (451, "4.4.3", False)
    assert str(error) == "451 4.4.3 temporary DNS failure, will retry"
    assert DnsPermanentError(550, "5.1.2", "x").permanent is True
