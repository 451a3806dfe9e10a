"""Routing: how mail for a recipient domain leaves — via its MX hosts, a fixed host, a smarthost, or not.

A :class:`Router` maps domains to :class:`Route` values. Keys are either an exact domain
(``example.com``) or a parent-domain wildcard written with a leading dot (``.example.com``), which
matches every subdomain of example.com but not example.com itself (write both to cover both). Lookup
order: the exact domain, then the wildcards from the closest parent outwards, then the default route.

Invariants:
- Domains are compared case-insensitively, without a trailing dot, in their IDNA (xn--) form, so
  ``Bücher.example`` and ``xn--bcher-kva.example.`` find the same route.
- A route never carries credentials over an unencrypted or unauthenticated-on-demand channel: a route
  with a username/password must use ``tls = "required"`` or ``"verified"``.
- A password never appears in ``repr()`` (and so never in a log line or traceback).
- :meth:`Route.parse` and :meth:`Router.from_config` raise :class:`ValueError` with a message naming the
  key at fault; nothing else here raises.
Pure: standard library only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

RouteKind = Literal["mx", "host", "smarthost", "reject"]
TlsMode = Literal["none", "opportunistic", "required", "verified"]

ROUTE_KINDS: tuple[RouteKind, ...] = ("mx", "host", "smarthost", "reject")
TLS_MODES: tuple[TlsMode, ...] = ("none", "opportunistic", "required", "verified")
_ROUTE_KEYS = frozenset({"kind", "host", "port", "tls", "username", "password",
                         "reject_code", "reject_enhanced", "reject_text"})
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$", re.ASCII)

DEFAULT_REJECT_CODE = 550
DEFAULT_REJECT_ENHANCED = "5.7.1"
DEFAULT_REJECT_TEXT = "Delivery to this domain is not permitted"


class RouteError(ValueError):
    """An inconsistent route; ``key`` names the field at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Route:
    """Where and how to deliver.

    ``mx``: look up the domain's MX hosts (``host`` unused; ``port`` is normally 25).
    ``host``: connect straight to ``host`` (no MX lookup). ``smarthost``: hand everything to an upstream
    relay at ``host``, optionally with AUTH. ``reject``: do not deliver; fail the recipient with
    ``reject_code`` / ``reject_enhanced`` / ``reject_text``.
    """

    kind: RouteKind
    host: str | None = None
    port: int = 25
    tls: TlsMode = "opportunistic"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reject_code: int = DEFAULT_REJECT_CODE
    reject_enhanced: str = DEFAULT_REJECT_ENHANCED
    reject_text: str = DEFAULT_REJECT_TEXT

    def __post_init__(self) -> None:
        problem = _route_problem(self)
        if problem is not None:
            raise RouteError(*problem)

    def __repr__(self) -> str:
        # Spelled out (rather than repr=False alone) so that it says a password is set without showing it.
        parts = [f"kind={self.kind!r}"]
        if self.host is not None:
            parts.append(f"host={self.host!r}")
        if self.kind != "reject":
            parts += [f"port={self.port}", f"tls={self.tls!r}"]
        if self.username is not None:
            parts.append(f"username={self.username!r}")
        if self.password is not None:
            parts.append("password='***'")
        if self.kind == "reject":
            parts += [f"reject_code={self.reject_code}", f"reject_enhanced={self.reject_enhanced!r}",
                      f"reject_text={self.reject_text!r}"]
        return f"Route({', '.join(parts)})"

    __str__ = __repr__

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    @classmethod
    def parse(cls, spec: Mapping[str, object], where: str = "route") -> Route:
        """Build a route from a config table; :class:`ValueError` names ``where.key`` on any problem."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: must be a table, got {type(spec).__name__}")
        unknown = sorted(str(key) for key in spec if key not in _ROUTE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                             f"(allowed: {', '.join(sorted(_ROUTE_KEYS))})")
        kind = _choice(spec.get("kind", "host" if "host" in spec else "mx"), ROUTE_KINDS, f"{where}.kind")
        host = _optional_str(spec.get("host"), f"{where}.host")
        code = _reject_code(spec.get("reject_code", DEFAULT_REJECT_CODE), f"{where}.reject_code")
        try:
            return cls(
                kind=kind,
                host=normalise_host(host, f"{where}.host") if host is not None else None,
                port=_port(spec.get("port", 587 if kind == "smarthost" else 25), f"{where}.port"),
                tls=_choice(spec.get("tls", "required" if kind == "smarthost" else "opportunistic"),
                            TLS_MODES, f"{where}.tls"),
                username=_optional_str(spec.get("username"), f"{where}.username"),
                password=_optional_str(spec.get("password"), f"{where}.password"),
                reject_code=code,
                reject_enhanced=_optional_str(spec.get("reject_enhanced"), f"{where}.reject_enhanced")
                or _default_enhanced(code),
                reject_text=_optional_str(spec.get("reject_text"), f"{where}.reject_text")
                or DEFAULT_REJECT_TEXT,
            )
        except RouteError as exc:
            raise ValueError(f"{where}.{exc.key}: {exc.problem}") from None


def _route_problem(route: Route) -> tuple[str, str] | None:
    """The first inconsistency of a route as (key, message), or None."""
    if route.kind not in ROUTE_KINDS:
        return "kind", f"must be one of {', '.join(ROUTE_KINDS)}, got {route.kind!r}"
    if route.tls not in TLS_MODES:
        return "tls", f"must be one of {', '.join(TLS_MODES)}, got {route.tls!r}"
    if route.kind in ("host", "smarthost") and not route.host:
        return "host", f"is required for kind = {route.kind!r}"
    if route.kind in ("mx", "reject") and route.host is not None:
        return "host", f"is not used with kind = {route.kind!r} (use kind = 'host' to pin a server)"
    if isinstance(route.port, bool) or not isinstance(route.port, int) or not 1 <= route.port <= 65535:
        return "port", f"must be a port number 1-65535, got {route.port!r}"
    if (route.username is None) != (route.password is None):
        return "username", "username and password must be given together"
    if route.username is not None:
        if route.kind != "smarthost":
            return "username", "credentials are only used with kind = 'smarthost'"
        if route.tls not in ("required", "verified"):
            return "tls", ("must be 'required' or 'verified' when a username/password is set "
                           "(credentials never travel unencrypted)")
    if route.kind == "reject":
        return _reject_problem(route)
    return None


def _reject_problem(route: Route) -> tuple[str, str] | None:
    if not 400 <= route.reject_code <= 599:
        return "reject_code", f"must be a 4xx or 5xx reply code, got {route.reject_code!r}"
    match = _ENHANCED.match(route.reject_enhanced)
    if match is None:
        return "reject_enhanced", f"must be an enhanced status code like 5.7.1, got {route.reject_enhanced!r}"
    if match.group(1) != str(route.reject_code)[0]:
        return "reject_enhanced", (f"class {match.group(1)} does not match reply code "
                                   f"{route.reject_code} (use {str(route.reject_code)[0]}.x.x)")
    if not route.reject_text or any(ch in route.reject_text for ch in "\r\n") \
            or not route.reject_text.isprintable():
        return "reject_text", "must be one line of printable text"
    return None


_Choice = TypeVar("_Choice", bound=str)


def _choice(value: object, allowed: tuple[_Choice, ...], where: str) -> _Choice:
    for choice in allowed:
        if value == choice:
            return choice
    raise ValueError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")


def _optional_str(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: must be a string, got {type(value).__name__}")
    return value


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{where}: must be a port number 1-65535, got {value!r}")
    return value


def _reject_code(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ValueError(f"{where}: must be a 4xx or 5xx reply code, got {value!r}")
    return value


def _default_enhanced(code: int) -> str:
    return "4.7.1" if 400 <= code < 500 else DEFAULT_REJECT_ENHANCED


# ------------------------------------------------------------------------------------------------
# Domain names
# ------------------------------------------------------------------------------------------------

def normalise_domain(domain: str) -> str:
    """Lower-case, no trailing dot, IDNA (xn--) form; raise :class:`ValueError` if it cannot be."""
    name = domain.strip().rstrip(".").lower()
    if not name or name.startswith(".") or ".." in name:
        raise ValueError(f"{domain!r} is not a domain name")
    labels = []
    for label in name.split("."):
        if not label.isascii():
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise ValueError(f"{domain!r} is not a valid internationalised domain name: {exc}") from None
        if not _HOST_LABEL.match(label):
            raise ValueError(f"{domain!r} is not a domain name (bad label {label!r})")
        labels.append(label)
    return ".".join(labels)


def normalise_host(host: str, where: str) -> str:
    """A server name or IP address (``[…]`` accepted) for a host/smarthost route."""
    literal = host.strip()
    if literal.startswith("[") and literal.endswith("]"):
        literal = literal[1:-1]
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    try:
        return normalise_domain(host)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _normalise_key(key: str) -> str:
    if key.startswith("."):
        return "." + normalise_domain(key[1:])
    return normalise_domain(key)


# ------------------------------------------------------------------------------------------------
# Router
# ------------------------------------------------------------------------------------------------

class Router:
    """Maps a recipient domain to its route (exact, then ``.parent`` wildcards, then the default)."""

    def __init__(self, routes: Mapping[str, Route], default: Route) -> None:
        table: dict[str, Route] = {}
        for key, route in routes.items():
            try:
                normal = _normalise_key(key)
            except ValueError as exc:
                raise ValueError(f"routes: key {key!r}: {exc}") from None
            if normal in table:
                raise ValueError(f"routes: {key!r} duplicates another key once normalised ({normal!r})")
            table[normal] = route
        self._routes = table
        self._default = default

    @classmethod
    def from_config(cls, routes: Mapping[str, Mapping[str, object]],
                    default: Mapping[str, object] | None = None, where: str = "routes") -> Router:
        """Build from config tables: ``{"example.com": {"kind": "smarthost", …}}`` and a default table."""
        parsed = {key: Route.parse(spec, f"{where}.{key!r}") for key, spec in routes.items()}
        default_route = Route.parse(default, f"{where}.default") if default is not None else Route("mx")
        return cls(parsed, default_route)

    @property
    def default(self) -> Route:
        return self._default

    def route_for(self, domain: str) -> Route:
        try:
            name = normalise_domain(domain)
        except ValueError:
            # Address literals ("[192.0.2.1]") and malformed names are not ours to route specially.
            return self._default
        exact = self._routes.get(name)
        if exact is not None:
            return exact
        labels = name.split(".")
        for start in range(1, len(labels)):
            wildcard = self._routes.get("." + ".".join(labels[start:]))
            if wildcard is not None:
                return wildcard
        return self._default


__all__ = [
    "ROUTE_KINDS",
    "TLS_MODES",
    "Route",
    "RouteError",
    "RouteKind",
    "Router",
    "TlsMode",
    "normalise_domain",
    "normalise_host",
]
