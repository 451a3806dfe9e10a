"""Routes and the router: parsing with clear errors, lookup order, IDNA, hidden passwords."""

from __future__ import annotations

import pytest
from relay.policies.routing import Route, RouteError, Router, normalise_domain

MX = Route("mx")
PINNED = Route("host", host="mail.example.com")
WILDCARD = Route("host", host="wild.example.com", port=2525)
SMARTHOST = Route("smarthost", host="smtp.provider.net", port=587, tls="required",
                  username="relay", password="s3cret-pass")


def test_lookup_order_exact_then_closest_wildcard_then_default() -> None:
    router = Router({
        "example.com": PINNED,
        ".example.com": WILDCARD,
        ".deep.example.com": SMARTHOST,
    }, default=MX)
    assert router.route_for("example.com") is PINNED
    assert router.route_for("a.example.com") is WILDCARD
    assert router.route_for("x.deep.example.com") is SMARTHOST
    assert router.route_for("deep.example.com") is WILDCARD  # ".deep…" is for subdomains only
    assert router.route_for("example.org") is MX
    assert router.route_for("notexample.com") is MX


def test_wildcard_does_not_match_the_domain_itself() -> None:
    router = Router({".example.com": WILDCARD}, default=MX)
    assert router.route_for("example.com") is MX


def test_matching_is_case_insensitive_and_ignores_trailing_dot() -> None:
    router = Router({"Example.COM.": PINNED}, default=MX)
    assert router.route_for("EXAMPLE.com") is PINNED
    assert router.route_for("example.com.") is PINNED


def test_idna_normalisation_both_ways() -> None:
    router = Router({"bücher.example": PINNED, ".xn--mnchen-3ya.example": WILDCARD}, default=MX)
    assert router.route_for("xn--bcher-kva.example") is PINNED
    assert router.route_for("BÜCHER.example") is PINNED
    assert router.route_for("post.münchen.example") is WILDCARD
    assert normalise_domain("Bücher.Example.") == "xn--bcher-kva.example"


def test_address_literals_and_junk_get_the_default() -> None:
    router = Router({"example.com": PINNED}, default=MX)
    assert router.route_for("[192.0.2.1]") is MX
    assert router.route_for("") is MX
    assert router.route_for("a..b") is MX


def test_bad_or_duplicate_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="key 'bad domain'"):
        Router({"bad domain": PINNED}, default=MX)
    with pytest.raises(ValueError, match="duplicates"):
        Router({"Example.com": PINNED, "example.COM.": WILDCARD}, default=MX)


def test_password_is_hidden_from_repr_and_str() -> None:
    assert "s3cret-pass" not in repr(SMARTHOST)
    assert "s3cret-pass" not in str(SMARTHOST)
    assert "password='***'" in repr(SMARTHOST)
    assert "password" not in repr(PINNED)


def test_parse_defaults() -> None:
    assert Route.parse({}) == Route("mx")
    assert Route.parse({"host": "[192.0.2.7]"}) == Route("host", host="192.0.2.7")
    smart = Route.parse({"kind": "smarthost", "host": "SMTP.Provider.net", "username": "u", "password": "p"})
    assert (smart.host, smart.port, smart.tls, smart.has_credentials) == \
        ("smtp.provider.net", 587, "required", True)
    reject = Route.parse({"kind": "reject"})
    assert (reject.reject_code, reject.reject_enhanced) == (550, "5.7.1")
    soft = Route.parse({"kind": "reject", "reject_code": 450, "reject_text": "Try later"})
    assert (soft.reject_code, soft.reject_enhanced, soft.reject_text) == (450, "4.7.1", "Try later")


def test_parse_ipv6_host() -> None:
    assert Route.parse({"kind": "host", "host": "[::1]", "port": 2525}).host == "::1"


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "carrier-pigeon"}, "route.kind: must be one of mx, host, smarthost, reject"),
    ({"kind": "host"}, "route.host: is required for kind = 'host'"),
    ({"kind": "smarthost"}, "route.host: is required for kind = 'smarthost'"),
    ({"kind": "mx", "host": "a.example"}, "route.host: is not used with kind = 'mx'"),
    ({"kind": "host", "host": "a b"}, "route.host: 'a b' is not a domain name"),
    ({"kind": "host", "host": 7}, "route.host: must be a string"),
    ({"kind": "host", "host": "a.example", "port": 0}, "route.port: must be a port number"),
    ({"kind": "host", "host": "a.example", "port": "25"}, "route.port: must be a port number"),
    ({"kind": "host", "host": "a.example", "port": True}, "route.port: must be a port number"),
    ({"kind": "host", "host": "a.example", "tls": "maybe"}, "route.tls: must be one of"),
    ({"kind": "smarthost", "host": "a.example", "username": "u"},
     "route.username: username and password must be given together"),
    ({"kind": "smarthost", "host": "a.example", "username": "u", "password": "p", "tls": "opportunistic"},
     "route.tls: must be 'required' or 'verified'"),
    ({"kind": "host", "host": "a.example", "username": "u", "password": "p", "tls": "required"},
     "route.username: credentials are only used with kind = 'smarthost'"),
    ({"kind": "reject", "reject_code": 250}, "route.reject_code: must be a 4xx or 5xx"),
    ({"kind": "reject", "reject_code": 550, "reject_enhanced": "4.1.1"},
     "route.reject_enhanced: class 4 does not match reply code 550"),
    ({"kind": "reject", "reject_enhanced": "5.1"}, "route.reject_enhanced: must be an enhanced status"),
    ({"kind": "reject", "reject_text": "evil\r\nBcc: x"}, "route.reject_text: must be one line"),
    ({"kind": "mx", "hots": "x"}, "route: unknown key(s) 'hots'"),
])
def test_parse_errors_name_the_key(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Route.parse(spec)
    assert message in str(info.value)


def test_parse_error_mentions_where() -> None:
    with pytest.raises(ValueError, match=r"^delivery\.routes\.'x\.example'\.host: "):
        Route.parse({"kind": "host"}, where="delivery.routes.'x.example'")


def test_password_never_in_error_messages() -> None:
    with pytest.raises(ValueError) as info:
        Route.parse({"kind": "smarthost", "host": "a.example", "username": "u", "password": "hunter2",
                     "tls": "none"})
    assert "hunter2" not in str(info.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(RouteError) as info:
        Route("smarthost", host="a.example", username="u", password="p", tls="none")
    assert info.value.key == "tls"


def test_router_from_config() -> None:
    router = Router.from_config(
        {"example.com": {"kind": "reject", "reject_text": "No mail for you"},
         ".corp.example": {"kind": "smarthost", "host": "relay.corp.example", "username": "u",
                           "password": "p", "tls": "verified"}},
        default={"kind": "mx", "tls": "required"},
    )
    assert router.route_for("example.com").kind == "reject"
    assert router.route_for("hr.corp.example").tls == "verified"
    assert router.default == Route("mx", tls="required")
    assert Router.from_config({}).default == Route("mx")
    with pytest.raises(ValueError, match=r"routes\.'bad\.example'\.host"):
        Router.from_config({"bad.example": {"kind": "host"}})
