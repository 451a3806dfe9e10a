"""MX resolution for outbound delivery: which hosts, at which addresses, in which order, to try for a domain.

:meth:`MxResolver.resolve` turns a recipient domain into an ordered list of :class:`MxHost`, or raises a
:class:`DnsError` that already carries the SMTP reply the delivery side reports:

=====================================================  ======================  =========
situation                                              error                   reply
=====================================================  ======================  =========
domain empty, too long, illegal characters, bad IDNA   DnsPermanentError       550 5.1.2
NXDOMAIN, or no MX and no A/AAAA (RFC 5321 5.1)        DnsPermanentError       550 5.1.2
null MX (RFC 7505: one MX, preference 0, exchange ".")  DnsPermanentError       550 5.1.10
every MX host is unusable (bad name, no such host)     DnsPermanentError       550 5.4.4
SERVFAIL, REFUSED, timeout, network error, CNAME loop  DnsTemporaryError       451 4.4.3
only private/loopback/… addresses found                DnsTemporaryError       451 4.4.4
=====================================================  ======================  =========

Why "only non-public addresses" is *temporary*: the most common causes are on our side, not the
recipient's — a split-horizon resolver answering with an internal view, or a deployment that delivers to
internal hosts and has not set ``allow_private``. Bouncing would lose mail over a fixable configuration
mistake; deferring leaves time to fix it, and the retry policy's maximum lifetime still ends it.

Order: MX preference ascending; hosts of equal preference are shuffled on every call (RFC 5321 5.1, load
spreading). Each host's A and AAAA are looked up concurrently; IPv4 addresses come first in
``MxHost.addresses`` (IPv6 delivery is refused more often for missing PTR/reputation). A host whose
lookups fail is skipped; only when every host fails does the domain fail. Address literals
(``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) are accepted as the domain and yield one host.

Invariants:
- Nothing but :class:`DnsError` escapes :meth:`MxResolver.resolve` (cancellation aside); anything
  unexpected becomes a temporary error, never a bounce.
- Work per call is bounded: at most :data:`MAX_MX_RECORDS` MX records are considered, at most
  ``max_hosts`` hosts are looked up, every lookup is bounded by ``timeout`` and the whole call by a
  deadline of a few ``timeout``.
- Answers are cached per (name, type) for the smallest TTL in the answer (CNAMEs included), capped at
  :data:`MAX_TTL`; negative answers for the SOA minimum (capped at :data:`MAX_NEGATIVE_TTL`) or
  :data:`DEFAULT_NEGATIVE_TTL` without a SOA; temporary failures are never cached. The cache is an LRU
  bounded by ``cache_max_entries``. Identical lookups in flight at the same time share one query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna

from relay.log import get_logger

log = get_logger(__name__)

#: MX records considered per domain, after sorting by preference (a hostile zone may publish thousands).
MAX_MX_RECORDS = 50
#: Longest we keep any positive answer, whatever TTL it claims.
MAX_TTL = 86_400
#: Negative answers: SOA minimum, capped here (RFC 2308 advises hours at most) …
MAX_NEGATIVE_TTL = 3_600
#: … or this when the response carries no SOA.
DEFAULT_NEGATIVE_TTL = 60
#: Per-attempt UDP/TCP timeout never exceeds this, so a lost datagram is retried within ``timeout``.
_MAX_ATTEMPT_TIMEOUT = 2.0
#: EDNS payload we advertise: the DNS flag day 2020 value, safe from fragmentation.
_EDNS_PAYLOAD = 1232

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


# --- errors -------------------------------------------------------------------------------------------


class DnsError(Exception):
    """A resolution failure with the SMTP reply to report for it; ``detail`` is for the log only."""

    permanent: bool = False

    def __init__(self, code: int, enhanced: str, text: str, detail: str = "") -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.detail = detail


class DnsPermanentError(DnsError):
    """The domain cannot receive mail as published; the message should bounce."""

    permanent = True


class DnsTemporaryError(DnsError):
    """Resolution failed for now; the message should be retried later."""

    permanent = False


def _invalid_domain(detail: str) -> DnsPermanentError:
    return DnsPermanentError(550, "5.1.2", "bad destination domain", detail)


def _domain_not_found(detail: str) -> DnsPermanentError:
    return DnsPermanentError(550, "5.1.2", "destination domain not found", detail)


def _null_mx(detail: str) -> DnsPermanentError:
    return DnsPermanentError(550, "5.1.10", "domain does not accept mail (null MX)", detail)


def _no_usable_host(detail: str) -> DnsPermanentError:
    return DnsPermanentError(550, "5.4.4", "no usable mail server for the domain", detail)


def _dns_unavailable(detail: str) -> DnsTemporaryError:
    return DnsTemporaryError(451, "4.4.3", "temporary DNS failure, will retry", detail)


def _no_public_address(detail: str) -> DnsTemporaryError:
    return DnsTemporaryError(451, "4.4.4", "no usable mail server address, will retry", detail)


# --- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MxHost:
    """One host to try: its name (ASCII, no final dot), MX preference and addresses (IPv4 first)."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class _Answer:
    """A cached lookup outcome: records (MX as ``(preference, exchange)``, A/AAAA as text) or negative."""

    kind: Literal["ok", "nodata", "nxdomain"]
    records: tuple[tuple[int, str], ...] | tuple[str, ...] = ()


class _LookupFailed(Exception):
    """A temporary failure of one lookup (internal: mapped by the caller to the right DnsError)."""


@dataclass(frozen=True)
class _HostAddresses:
    """What looking up one host gave: usable addresses, how many were dropped, whether lookups failed."""

    usable: tuple[str, ...]
    dropped: int
    failed: bool


# --- input validation ---------------------------------------------------------------------------------


def ascii_domain(domain: str) -> str:
    """The domain as lowercase ASCII (IDNA 2008 A-labels, no final dot); raise 5.1.2 if it is not one."""
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        raise _invalid_domain("empty domain")
    if len(name) > 253 * 4:  # pointless to IDNA-encode megabytes; a valid name is far shorter
        raise _invalid_domain("domain too long")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise _invalid_domain(f"cannot IDNA-encode {domain!r}: {exc}") from None
    name = name.lower()
    if not is_hostname(name):
        raise _invalid_domain(f"not a valid domain: {domain!r}")
    return name


def is_hostname(name: str) -> bool:
    """RFC 5321 ``Domain`` syntax (LDH labels), with a non-numeric last label so IP texts don't pass."""
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()


def _address_literal(domain: str) -> str | None:
    """The IP inside ``[a.b.c.d]`` or ``[IPv6:…]``; None when the domain is not a literal; 5.1.2 if bad."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise _invalid_domain(f"bad address literal {domain!r}") from None


def is_public_address(text: str) -> bool:
    """Whether mail may go to this address without ``allow_private``: a global unicast address."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback in disguise
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_reserved:
        return False
    # is_global excludes RFC 1918, ULA, CGNAT, documentation and the other special-purpose blocks.
    return ip.is_global


def parse_nameserver(entry: str) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"``, ``"[v6]:port"`` or a bare IPv6 address → (ip, port); ValueError if bad."""
    host, port = entry.strip(), 53
    if host.startswith("["):
        inside, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {entry!r}")
        host, port = inside, int(rest[1:]) if rest else 53
    elif host.count(":") == 1:
        host, _, port_text = host.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # raises ValueError for a name or garbage
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver port in {entry!r}")
    return host, port


# --- the resolver -------------------------------------------------------------------------------------


class MxResolver:
    """Resolves recipient domains to ordered MX hosts with addresses; see the module docstring.

    ``nameservers``: ``"ip"`` or ``"ip:port"`` entries; empty uses the system resolver
    (``/etc/resolv.conf``; the constructor raises ValueError for a bad entry and dnspython's
    NoResolverConfiguration without a usable resolv.conf — start-up errors, not delivery ones).
    ``timeout`` bounds each lookup (seconds). ``max_hosts`` caps the MX hosts
    looked up and returned. ``allow_private`` keeps loopback/private/link-local addresses.
    ``cache_hits`` / ``cache_misses`` count lookups answered from / not found in the cache.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 5.0,
        max_hosts: int = 5,
        allow_private: bool = False,
        cache_max_entries: int = 10_000,
    ) -> None:
        if timeout <= 0 or max_hosts < 1 or cache_max_entries < 0:
            raise ValueError("timeout must be > 0, max_hosts >= 1 and cache_max_entries >= 0")
        self.timeout = timeout
        self.max_hosts = max_hosts
        self.allow_private = allow_private
        self.cache_max_entries = cache_max_entries
        self.cache_hits = 0
        self.cache_misses = 0
        self._resolver = _make_dns_resolver(nameservers, timeout)
        self._cache: OrderedDict[tuple[str, str], tuple[float, _Answer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[_Answer]] = {}

    async def resolve(self, domain: str) -> list[MxHost]:
        """The hosts to try for ``domain``, best first; raises DnsPermanentError / DnsTemporaryError."""
        try:
            # Every lookup is bounded already; this deadline is the backstop against anything unforeseen.
            async with asyncio.timeout(self.timeout * 3 + 1):
                return await self._resolve(domain)
        except DnsError as exc:
            log.info("mx_resolve_failed", domain=_loggable(domain), code=exc.code, enhanced=exc.enhanced,
                     detail=exc.detail)
            raise
        except TimeoutError:
            log.warning("mx_resolve_deadline", domain=_loggable(domain))
            raise _dns_unavailable("resolution deadline passed") from None
        except Exception as exc:  # the contract: nothing but DnsError leaves resolve()
            log.exception("mx_resolve_crashed", domain=_loggable(domain))
            raise _dns_unavailable(f"unexpected {type(exc).__name__}") from None

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- the resolution steps ----------------------------------------------------------------------

    async def _resolve(self, domain: str) -> list[MxHost]:
        literal = _address_literal(domain)
        if literal is not None:
            return [self._literal_host(domain, literal)]
        name = ascii_domain(domain)
        try:
            answer = await self._lookup(name, "MX")
        except _LookupFailed as exc:
            raise _dns_unavailable(f"MX {name}: {exc}") from None
        if answer.kind == "nxdomain":
            raise _domain_not_found(f"{name}: NXDOMAIN")
        if answer.kind == "nodata" or not answer.records:
            return await self._implicit_mx(name)
        records = sorted(_mx_records(answer))[:MAX_MX_RECORDS]
        if len(records) == 1 and records[0] == (0, "."):
            raise _null_mx(f"{name}: null MX")
        return await self._mx_hosts(name, records)

    def _literal_host(self, domain: str, address: str) -> MxHost:
        if not self.allow_private and not is_public_address(address):
            raise _no_public_address(f"{domain}: address literal is not public")
        return MxHost(domain, 0, (address,))

    async def _implicit_mx(self, name: str) -> list[MxHost]:
        """RFC 5321 5.1: without MX records the domain itself is the one host, with preference 0."""
        found = await self._host_addresses(name)
        if found.usable:
            return [MxHost(name, 0, found.usable)]
        if found.failed:
            raise _dns_unavailable(f"{name}: no MX, address lookups failed")
        if found.dropped:
            raise _no_public_address(f"{name}: no MX, only non-public addresses")
        raise _domain_not_found(f"{name}: neither MX nor address records")

    async def _mx_hosts(self, name: str, records: list[tuple[int, str]]) -> list[MxHost]:
        candidates = _ordered_candidates(records)[: self.max_hosts]
        if not candidates:
            raise _no_usable_host(f"{name}: no MX record names a valid host")
        results = await asyncio.gather(*(self._host_addresses(host) for _, host in candidates))
        hosts = [MxHost(host, pref, found.usable)
                 for (pref, host), found in zip(candidates, results, strict=True) if found.usable]
        if hosts:
            return hosts
        if any(found.failed for found in results):
            raise _dns_unavailable(f"{name}: every MX host lookup failed")
        if any(found.dropped for found in results):
            raise _no_public_address(f"{name}: MX hosts have only non-public addresses")
        raise _no_usable_host(f"{name}: no MX host has an address")

    async def _host_addresses(self, host: str) -> _HostAddresses:
        """A and AAAA for one host, concurrently; one family failing does not lose the other."""
        outcomes = await asyncio.gather(self._lookup(host, "A"), self._lookup(host, "AAAA"),
                                        return_exceptions=True)
        addresses: list[str] = []
        failed = 0
        for outcome in outcomes:
            if isinstance(outcome, _LookupFailed):
                failed += 1
            elif isinstance(outcome, BaseException):
                raise outcome  # not a DNS outcome: let resolve() report it
            elif outcome.kind == "ok":
                addresses.extend(str(record) for record in outcome.records)
        usable = [a for a in dict.fromkeys(addresses) if self.allow_private or is_public_address(a)]
        dropped = len(set(addresses)) - len(usable)
        if dropped:
            log.info("mx_addresses_dropped", host=host, dropped=dropped)
        return _HostAddresses(tuple(usable), dropped, failed == len(outcomes))

    # -- lookups with cache ------------------------------------------------------------------------

    async def _lookup(self, name: str, rdtype: str) -> _Answer:
        """One (name, type) lookup: from the cache, joined to an identical one in flight, or queried."""
        key = (name, rdtype)
        cached = self._cache_get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        self.cache_misses += 1
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query_and_cache(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._query_done(key, done))
        # shield: one caller giving up must not cancel the query the others wait for.
        return await asyncio.shield(task)

    def _query_done(self, key: tuple[str, str], task: asyncio.Task[_Answer]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here so an abandoned failure is not reported as unhandled

    async def _query_and_cache(self, name: str, rdtype: str) -> _Answer:
        answer, ttl = await self._query(name, rdtype)
        self._cache_put((name, rdtype), answer, ttl)
        return answer

    async def _query(self, name: str, rdtype: str) -> tuple[_Answer, float]:
        """Ask the nameservers; return the answer and how long it may be cached. Raise _LookupFailed."""
        qname = dns.name.from_text(name + ".")
        try:
            result = await self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            # exc.kwargs is where dnspython keeps the responses (its accessors are untyped).
            return _Answer("nxdomain"), _negative_ttl(exc.kwargs.get("responses", {}).get(qname))
        except dns.resolver.NoAnswer as exc:  # only raised with raise_on_no_answer; kept for safety
            return _Answer("nodata"), _negative_ttl(exc.kwargs.get("response"))
        except (dns.exception.DNSException, OSError, ValueError, EOFError) as exc:
            # NoNameservers (SERVFAIL/REFUSED/bad or looping answers), LifetimeTimeout, network errors.
            raise _LookupFailed(f"{type(exc).__name__}: {exc}") from None
        if result.rrset is None:
            return _Answer("nodata"), _negative_ttl(result.response)
        ttl = min(max(result.chaining_result.minimum_ttl, 0), MAX_TTL)
        if rdtype == "MX":
            mx = tuple((int(rd.preference), _exchange_text(rd.exchange)) for rd in result.rrset)
            return _Answer("ok", mx), ttl
        return _Answer("ok", tuple(str(rd.address) for rd in result.rrset)), ttl

    def _cache_get(self, key: tuple[str, str]) -> _Answer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    def _cache_put(self, key: tuple[str, str], answer: _Answer, ttl: float) -> None:
        if ttl <= 0 or self.cache_max_entries == 0:
            return
        self._cache[key] = (time.monotonic() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_max_entries:
            self._cache.popitem(last=False)


# --- helpers ------------------------------------------------------------------------------------------


def _make_dns_resolver(nameservers: Sequence[str], timeout: float) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(entry))
                                for entry in nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, _MAX_ATTEMPT_TIMEOUT)
    resolver.use_edns(0, 0, _EDNS_PAYLOAD)
    resolver.cache = None  # ours does negative caching and counts; two caches would double-keep
    return resolver


def _exchange_text(exchange: dns.name.Name) -> str:
    """MX target as lowercase text without the final dot; the root (null MX) as ``"."``."""
    if exchange == dns.name.root:
        return "."
    return str(exchange.to_text(omit_final_dot=True)).lower()


def _mx_records(answer: _Answer) -> list[tuple[int, str]]:
    return [record for record in answer.records if isinstance(record, tuple)]


def _ordered_candidates(records: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """Valid, distinct MX hosts by preference, equal preferences shuffled (each host at its best pref)."""
    by_preference: dict[int, list[str]] = {}
    seen: set[str] = set()
    for preference, host in sorted(records):
        if host in seen:
            continue
        seen.add(host)
        if not is_hostname(host):
            # "." among other MX records, IP addresses written as names, escaped binary labels.
            log.info("mx_host_invalid", host=_loggable(host))
            continue
        by_preference.setdefault(preference, []).append(host)
    ordered: list[tuple[int, str]] = []
    for preference in sorted(by_preference):
        group = by_preference[preference]
        random.shuffle(group)
        ordered.extend((preference, host) for host in group)
    return ordered


def _loggable(text: str) -> str:
    """Untrusted text (recipient domains, MX names) made safe for one log line: short, escaped."""
    return text[:300].encode("unicode_escape").decode("ascii")


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: the SOA's TTL bounded by its minimum field; :data:`DEFAULT_NEGATIVE_TTL` without one."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                soa_min = int(rrset[0].minimum)
                return float(min(rrset.ttl, soa_min, MAX_NEGATIVE_TTL))
    return float(DEFAULT_NEGATIVE_TTL)
