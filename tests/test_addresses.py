"""The normal form of suppression values (policies/addresses.py): pure functions, checked directly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from relay.policies.addresses import (
    address_domain,
    check_value,
    guess_kind,
    normalize_address,
    normalize_domain,
    normalize_ip,
    normalize_value,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ("User@Example.COM", "user@example.com"),
    ("  <User@Example.COM>  ", "user@example.com"),
    ("user@example.com.", "user@example.com"),
    ("Jörg@Bücher.Example", "jörg@xn--bcher-kva.example"),
    ("x@XN--BCHER-KVA.EXAMPLE", "x@xn--bcher-kva.example"),
    # IDNA 2008 (as delivery encodes it), not the standard library's IDNA 2003 which maps ß to ss.
    ("x@straße.de", "x@xn--strae-oqa.de"),
    ('"Odd@Local"@Example.org', '"odd@local"@example.org'),  # split at the last @
    ("user+Tag@example.org", "user+tag@example.org"),       # sub-addresses are kept
    ("x@[192.0.2.1]", "x@[192.0.2.1]"),
    ("x@☃.example", "x@☃.example"),                          # not IDNA 2008: stable lower-case form
    ("no-at-sign", "no-at-sign"),
    ("< <A@B.example> >", "a@b.example"),
])
def test_normalize_address(raw: str, expected: str) -> None:
    assert normalize_address(raw) == expected


def test_unicode_local_parts_compare_in_nfc() -> None:
    composed, decomposed = "j\u00f6rg@example.org", "jo\u0308rg@example.org"
    assert normalize_address(decomposed) == normalize_address(composed) == composed


def test_domains_and_ips() -> None:
    assert normalize_domain("Bücher.Example.") == "xn--bcher-kva.example"
    assert address_domain("A@Bücher.Example") == "xn--bcher-kva.example"
    assert address_domain("nodomain") == ""
    assert normalize_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert normalize_ip("2001:DB8:0:0::1") == "2001:db8::1"
    assert normalize_ip("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert normalize_ip("not-an-ip") == "not-an-ip"


def test_guess_kind() -> None:
    assert guess_kind("a@example.org") == "address"
    assert guess_kind("192.0.2.1") == "ip"
    assert guess_kind("2001:db8::1") == "ip"
    assert guess_kind("example.org") == "domain"
    assert guess_kind("bücher.example") == "domain"


@pytest.mark.parametrize(("value", "kind"), [
    ("", "address"), ("nobody", "address"), ("@example.org", "address"), ("a b@example.org", "address"),
    ("a@exa mple.org", "address"), ("a@-bad.example", "address"), ("exa mple.org", "domain"),
    ("a..b", "domain"), ("a@b.example", "domain"), ("999.1.1.1", "ip"), ("example.org", "ip"),
    ("x@example.org", "mailbox"),
])
def test_check_value_refuses_what_an_operator_should_not_add(value: str, kind: str) -> None:
    with pytest.raises(ValueError):
        check_value(value, kind)


def test_check_value_returns_the_normal_form() -> None:
    assert check_value(" <A@Bücher.Example> ", "address") == "a@xn--bcher-kva.example"
    assert check_value("_dmarc.Example.org", "domain") == "_dmarc.example.org"
    assert check_value("::ffff:10.0.0.1", "ip") == "10.0.0.1"


# Mostly the characters normalisation cares about, plus anything else.
_VALUES = st.text(alphabet=st.sampled_from("<>[]@. \tAaZzßÖöİı\u0308:1f-_+\"") | st.characters(), max_size=40)


@given(_VALUES, st.sampled_from(["address", "domain", "ip"]))
def test_normal_form_is_total_and_stable(value: str, kind: str) -> None:
    once = normalize_value(value, kind)
    assert normalize_value(once, kind) == once
