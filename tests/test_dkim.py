"""DKIM signing: signatures checked by two independent verifiers, key checks, keygen, chain order, end to end.

Verifiers: dkimpy (the library the plugin signs with) and Mail::DKIM (Debian's libmail-dkim-perl, run by
tests/support/dkim_verify.pl), both fetching the public keys over real DNS from a loopback DNS server
that serves exactly the records ``relay dkim keygen`` prints. Debian 12's Mail::DKIM (1.20230212) has no
ed25519-sha256; for those signatures the tests accept from it only "pass" or "unsupported algorithm" —
never a failed check — and rely on dkimpy for the verdict.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
import threading
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from relay.plugins.dkim import DkimConfig, DkimPlugin, header_fields, signed_field_list

from relay.chain import Chain
from relay.cli import main as relay_main
from relay.dkimcli import dns_record_line, write_private_key
from relay.limits.memory import MemoryLimiter
from relay.plugin import (
    CONTINUE,
    AttemptContext,
    DataContext,
    Plugin,
    PluginConfig,
    PluginError,
    PluginHost,
    Verdict,
)
from relay.settings import ConfigError
from relay.sink import SinkConfig, SinkServer
from relay.store.base import RecipientRow, RecipientState, StoredMessage
from tests.support.dnsserver import DnsTestServer
from tests.support.relayfx import RelayFactory
from tests.support.smtpclient import RawClient

VERIFIER = Path(__file__).parent / "support" / "dkim_verify.pl"

MESSAGE = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Cc: carol@example.net\r\n"
    b"Subject: Quarterly numbers, as promised\r\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q1-2026@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <https://example.com/u/abc>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"Received: from client.test by relay.test\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the numbers are in the attachment we did not attach.\r\n"
)


# -- keys, DNS and the two verifiers ----------------------------------------------------------------------
@dataclass
class KeyMaterial:
    rsa2048: rsa.RSAPrivateKey
    rsa1024: rsa.RSAPrivateKey
    ed: ed25519.Ed25519PrivateKey


@pytest.fixture(scope="session")
def keys() -> KeyMaterial:
    # Made once per session: RSA generation is the slow part, and a key's value does not matter here.
    return KeyMaterial(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                       rsa.generate_private_key(public_exponent=65537, key_size=1024),
                       ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsTestServer]:
    async with DnsTestServer() as server:
        yield server


def publish(dns_server: DnsTestServer, zone_line: str) -> None:
    """Serve a zone-file TXT line as ``relay dkim keygen`` prints it: ``NAME. IN TXT "…" "…"``."""
    match = re.fullmatch(r'(\S+)\. IN TXT ((?:"[^"]*" ?)+)', zone_line)
    assert match, zone_line
    dns_server.add(match.group(1), "TXT", match.group(2))


def install_key(tmp_path: Path, dns_server: DnsTestServer, domain: str, selector: str,
                key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> Path:
    """Write the key as keygen does, publish its record; the path of the key file."""
    path = tmp_path / f"{domain}.{selector}.pem"
    write_private_key(path, key)
    publish(dns_server, dns_record_line(selector, domain, key))
    return path


def dkimpy_results(message: bytes, dns_server: DnsTestServer) -> list[bool]:
    """dkimpy's verdict per DKIM-Signature (top first), keys fetched from the loopback DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port
    resolver.lifetime = 5.0

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", tcp=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]  # dnspython's TXT rdata

    count = sum(1 for name, _ in dkim.DKIM(message).headers if name.lower() == b"dkim-signature")
    results = []
    for index in range(count):
        try:
            results.append(bool(dkim.DKIM(message).verify(index, dnsfunc=lookup)))
        except dkim.DKIMException:
            results.append(False)
    return results


async def dkimpy_verify(message: bytes, dns_server: DnsTestServer) -> list[bool]:
    # dkimpy blocks on its DNS lookups; the DNS server answers from this event loop, so run it aside.
    return await asyncio.to_thread(dkimpy_results, message, dns_server)


@dataclass
class MailDkimReport:
    version: str
    signatures: list[dict[str, Any]]

    def by_algorithm(self, algorithm: str) -> dict[str, Any]:
        [found] = [s for s in self.signatures if s["algorithm"] == algorithm]
        return found


async def mail_dkim_verify(message: bytes, dns_server: DnsTestServer) -> MailDkimReport:
    process = await asyncio.create_subprocess_exec(
        "perl", str(VERIFIER), "--nameserver", f"127.0.0.1:{dns_server.port}",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(message), 60)
    assert process.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    return MailDkimReport(lines[0]["version"], lines[1:])


def mail_dkim_ed25519_ok(signature: dict[str, Any]) -> bool:
    """Mail::DKIM on ed25519: a pass where it supports the algorithm, else it must say it does not."""
    return signature["result"] == "pass" or (
        signature["result"] == "invalid" and "unsupported algorithm" in signature["detail"])


# -- running the plugin -------------------------------------------------------------------------------------
def host() -> PluginHost:
    return PluginHost(hostname="relay.test", secret_key=None, limiter=MemoryLimiter())


@pytest.fixture
async def plugins() -> AsyncIterator[list[DkimPlugin]]:
    started: list[DkimPlugin] = []
    yield started
    for plugin in started:
        await plugin.stop()


async def start_plugin(plugins: list[DkimPlugin], config: dict[str, Any]) -> DkimPlugin:
    plugin = DkimPlugin(DkimConfig.model_validate(config), host())
    await plugin.start()
    plugins.append(plugin)
    return plugin


def stored(sender: str = "bounces@example.com") -> StoredMessage:
    return StoredMessage(id="Q1", sender=sender, size=len(MESSAGE), received_at=0.0, client_ip="127.0.0.1",
                         client_helo="client.test", auth_user=None, listener="relay", envid=None, ret=None,
                         smtputf8=False)


def attempt(data: bytes, sender: str = "bounces@example.com") -> AttemptContext:
    row = RecipientRow(id=1, message_id="Q1", address="bob@example.org", domain="example.org",
                       state=RecipientState.QUEUED, attempts=0, next_attempt_at=0.0, last_reply=None,
                       notify=None, orcpt=None, updated_at=0.0)
    return AttemptContext(message=stored(sender), recipients=[row], destination="example.org",
                          route_kind="mx", data=data)


async def sign(plugin: DkimPlugin, data: bytes = MESSAGE, sender: str = "bounces@example.com") -> bytes:
    ctx = attempt(data, sender)
    assert await plugin.before_attempt(ctx) == CONTINUE
    return ctx.data


def signature_tags(message: bytes) -> list[dict[bytes, bytes]]:
    values = [value for name, value in dkim.DKIM(message).headers if name.lower() == b"dkim-signature"]
    return [dkim.util.parse_tag_value(value) for value in values]


def key_entry(path: Path, selector: str, algorithm: str = "rsa-sha256", **extra: Any) -> dict[str, Any]:
    return {"selector": selector, "algorithm": algorithm, "key_file": str(path), **extra}


@pytest.fixture
async def rsa_signer(tmp_path: Path, dns_server: DnsTestServer, keys: KeyMaterial,
                     plugins: list[DkimPlugin]) -> DkimPlugin:
    path = install_key(tmp_path, dns_server, "example.com", "s2026", keys.rsa2048)
    return await start_plugin(plugins, {"domains": {"example.com": [key_entry(path, "s2026")]}})


@pytest.fixture
async def dual_signer(tmp_path: Path, dns_server: DnsTestServer, keys: KeyMaterial,
                      plugins: list[DkimPlugin]) -> DkimPlugin:
    rsa_path = install_key(tmp_path, dns_server, "example.com", "s2026", keys.rsa2048)
    ed_path = install_key(tmp_path, dns_server, "example.com", "e2026", keys.ed)
    return await start_plugin(plugins, {"domains": {"example.com": [
        key_entry(rsa_path, "s2026"), key_entry(ed_path, "e2026", "ed25519-sha256")]}})


# -- signatures, checked by both verifiers ----------------------------------------------------------------
async def test_rsa_signature_verifies_with_dkimpy_and_mail_dkim(rsa_signer: DkimPlugin,
                                                                dns_server: DnsTestServer) -> None:
    signed = await sign(rsa_signer)
    assert signed.endswith(MESSAGE)
    [tags] = signature_tags(signed)
    assert (tags[b"a"], tags[b"c"], tags[b"d"], tags[b"s"]) == (b"rsa-sha256", b"relaxed/relaxed",
                                                                  b"example.com", b"s2026")
    assert await dkimpy_verify(signed, dns_server) == [True]
    report = await mail_dkim_verify(signed, dns_server)
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", report.version)   # Debian 12 ships 1.20230212
    [result] = report.signatures
    assert (result["result"], result["domain"], result["selector"]) == ("pass", "example.com", "s2026")


async def test_ed25519_signature_verifies(tmp_path: Path, dns_server: DnsTestServer, keys: KeyMaterial,
                                          plugins: list[DkimPlugin]) -> None:
    path = install_key(tmp_path, dns_server, "example.com", "e2026", keys.ed)
    plugin = await start_plugin(plugins, {"domains": {"example.com": [key_entry(path, "e2026", "ed25519-sha256")]}})
    signed = await sign(plugin)
    [tags] = signature_tags(signed)
    assert tags[b"a"] == b"ed25519-sha256"
    assert await dkimpy_verify(signed, dns_server) == [True]
    report = await mail_dkim_verify(signed, dns_server)
    assert mail_dkim_ed25519_ok(report.by_algorithm("ed25519-sha256"))


async def test_dual_signing_adds_one_signature_per_key(dual_signer: DkimPlugin, dns_server: DnsTestServer) -> None:
    signed = await sign(dual_signer)
    tags = signature_tags(signed)
    assert sorted((t[b"a"], t[b"s"]) for t in tags) == [(b"ed25519-sha256", b"e2026"), (b"rsa-sha256", b"s2026")]
    assert tags[0][b"h"] == tags[1][b"h"] and tags[0][b"bh"] == tags[1][b"bh"]
    assert await dkimpy_verify(signed, dns_server) == [True, True]
    report = await mail_dkim_verify(signed, dns_server)
    # A verifier that does not know ed25519 still passes the message on its RSA signature (RFC 8463 §4).
    assert report.by_algorithm("rsa-sha256")["result"] == "pass"
    assert mail_dkim_ed25519_ok(report.by_algorithm("ed25519-sha256"))


async def test_signed_fields_are_the_configured_ones_and_from_is_oversigned(rsa_signer: DkimPlugin,
                                                                           dns_server: DnsTestServer) -> None:
    signed = await sign(rsa_signer)
    [tags] = signature_tags(signed)
    listed = [name.strip() for name in tags[b"h"].split(b":")]
    assert listed.count(b"from") == 2                        # one From in the message, listed twice
    for name in (b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
                 b"list-unsubscribe", b"list-unsubscribe-post"):
        assert listed.count(name) == 1, name
    assert b"received" not in listed and b"reply-to" not in listed   # absent fields are not listed
    report = await mail_dkim_verify(signed, dns_server)
    assert report.signatures[0]["headers"].count("from") == 2


@pytest.mark.parametrize("where", ["top", "bottom"])
async def test_a_second_from_breaks_the_signature(rsa_signer: DkimPlugin, dns_server: DnsTestServer,
                                                  where: str) -> None:
    signed = await sign(rsa_signer)
    extra = b"From: Mallory <ceo@example.com>\r\n"
    if where == "top":
        tampered = extra + signed
    else:
        head, sep, body = signed.partition(b"\r\n\r\n")
        tampered = head + b"\r\n" + extra.rstrip(b"\r\n") + sep + body
    assert await dkimpy_verify(tampered, dns_server) == [False]
    report = await mail_dkim_verify(tampered, dns_server)
    assert report.signatures[0]["result"] == "fail"


async def test_relaxed_canonicalisation_survives_whitespace_changes(dual_signer: DkimPlugin,
                                                                    dns_server: DnsTestServer) -> None:
    signed = await sign(dual_signer)
    reshaped = (signed
                .replace(b"Subject: Quarterly numbers, as promised",
                         b"SUBJECT:   Quarterly  numbers,\r\n\tas   promised  ")
                .replace(b"To: Bob <bob@example.org>", b"to:Bob    <bob@example.org>\t")
                .replace(b"Hello Bob,\r\n", b"Hello   Bob,  \r\n")
                + b"\r\n\r\n")
    assert reshaped != signed
    assert await dkimpy_verify(reshaped, dns_server) == [True, True]
    report = await mail_dkim_verify(reshaped, dns_server)
    assert report.by_algorithm("rsa-sha256")["result"] == "pass"
    assert mail_dkim_ed25519_ok(report.by_algorithm("ed25519-sha256"))


async def test_a_changed_body_breaks_the_signature(dual_signer: DkimPlugin, dns_server: DnsTestServer) -> None:
    signed = await sign(dual_signer)
    tampered = signed.replace(b"did not attach", b"did attach")
    assert await dkimpy_verify(tampered, dns_server) == [False, False]
    report = await mail_dkim_verify(tampered, dns_server)
    rsa_result = report.by_algorithm("rsa-sha256")
    assert rsa_result["result"] == "fail" and "body has been altered" in rsa_result["detail"]
    assert report.by_algorithm("ed25519-sha256")["result"] != "pass"


async def test_a_changed_signed_header_breaks_the_signature(rsa_signer: DkimPlugin,
                                                           dns_server: DnsTestServer) -> None:
    tampered = (await sign(rsa_signer)).replace(b"Quarterly numbers", b"Quarterly bonuses")
    assert await dkimpy_verify(tampered, dns_server) == [False]
    assert (await mail_dkim_verify(tampered, dns_server)).signatures[0]["result"] == "fail"


async def test_each_attempt_signs_the_unsigned_copy_afresh(rsa_signer: DkimPlugin,
                                                          dns_server: DnsTestServer) -> None:
    first = attempt(MESSAGE)
    await rsa_signer.before_attempt(first)
    second = attempt(MESSAGE)
    await rsa_signer.before_attempt(second)
    for ctx in (first, second):
        assert ctx.data.count(b"DKIM-Signature:") == 1 and ctx.data.endswith(MESSAGE)
        assert ctx.notes["dkim"] == [{"d": "example.com", "s": "s2026", "a": "rsa-sha256"}]
    assert await dkimpy_verify(second.data, dns_server) == [True]


async def test_signing_runs_in_the_signer_threads(rsa_signer: DkimPlugin, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real_sign = rsa_signer.sign

    def recording_sign(message: bytes, sender: str = "") -> Any:
        threads.append(threading.current_thread().name)
        return real_sign(message, sender)

    monkeypatch.setattr(rsa_signer, "sign", recording_sign)
    await sign(rsa_signer)
    assert len(threads) == 1 and threads[0].startswith("dkim") and threads[0] != threading.main_thread().name


async def test_an_unparsable_header_block_is_sent_unsigned(rsa_signer: DkimPlugin) -> None:
    broken = b"From: alice@example.com\r\nthis line is no header field\r\n\r\nbody\r\n"
    assert await sign(rsa_signer, broken) == broken


# -- which domain signs ----------------------------------------------------------------------------------
@pytest.fixture
async def two_domains(tmp_path: Path, dns_server: DnsTestServer, keys: KeyMaterial,
                      plugins: list[DkimPlugin]) -> DkimPlugin:
    """example.com (also for its subdomains), bounce.example (the envelope domain), relay.example (default)."""
    entries = {}
    for domain, extra in (("example.com", {"subdomains": True}), ("bounce.example", {}), ("relay.example", {})):
        path = install_key(tmp_path, dns_server, domain, "s1", keys.rsa2048)
        entries[domain] = [key_entry(path, "s1", **extra)]
    return await start_plugin(plugins, {"domains": entries, "default_domain": "relay.example"})


def with_from(from_lines: bytes) -> bytes:
    return from_lines + b"To: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.mark.parametrize(("from_lines", "sender", "domain"), [
    # The author's domain, aligned for DMARC, whatever the envelope says.
    (b"From: a@example.com\r\n", "x@bounce.example", b"example.com"),
    (b"From: \"A\" <a@EXAMPLE.com.>\r\n", "", b"example.com"),
    # A subdomain without a key of its own uses its parent's (listed with subdomains = true).
    (b"From: a@news.example.com\r\n", "x@bounce.example", b"example.com"),
    # No key for the author's domain: the envelope sender's domain.
    (b"From: a@elsewhere.example\r\n", "x@bounce.example", b"bounce.example"),
    # A parent without subdomains = true does not sign for its subdomains: default_domain does.
    (b"From: a@sub.bounce.example\r\n", "x@unknown.example", b"relay.example"),
    # Two From fields, or one naming two domains: not an author domain we can vouch for.
    (b"From: a@example.com\r\nFrom: b@example.com\r\n", "x@bounce.example", b"bounce.example"),
    (b"From: a@example.com, b@other.example\r\n", "", b"relay.example"),
    (b"From: a@example.com, b@Example.com\r\n", "", b"example.com"),
])
async def test_the_signing_domain(two_domains: DkimPlugin, dns_server: DnsTestServer, from_lines: bytes,
                                  sender: str, domain: bytes) -> None:
    signed = await sign(two_domains, with_from(from_lines), sender)
    [tags] = signature_tags(signed)
    assert tags[b"d"] == domain
    assert await dkimpy_verify(signed, dns_server) == [True]


async def test_no_key_no_signature(rsa_signer: DkimPlugin) -> None:
    message = with_from(b"From: a@unknown.example\r\n")
    ctx = attempt(message, "x@other.example")
    assert await rsa_signer.before_attempt(ctx) == CONTINUE
    assert ctx.data == message and "dkim" not in ctx.notes


def test_field_list_counts_occurrences_and_oversigns() -> None:
    fields = header_fields(b"From: a@x.example\r\nTo: b@y.example\r\nTo: c@y.example\r\n"
                           b"Subject: folded\r\n  line\r\n\r\nFrom: in the body\r\n")
    assert fields[2] == ("to", b"c@y.example") and fields[3] == ("subject", b"folded line")
    assert signed_field_list(fields, ["From", "To", "Subject", "Reply-To"], ["From", "Reply-To"]) == [
        b"from", b"from", b"to", b"to", b"subject", b"reply-to"]


# -- start-up: keys and configuration --------------------------------------------------------------------
def write_pem(path: Path, key: Any) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@pytest.mark.parametrize(("case", "algorithm", "message"), [
    ("missing", "rsa-sha256", "not found"),
    ("garbage", "rsa-sha256", "not a PEM private key"),
    ("public", "rsa-sha256", "not a PEM private key"),
    ("encrypted", "rsa-sha256", "the key is encrypted"),
    ("short", "rsa-sha256", "RSA key of 1024 bits is too short; rsa-sha256 needs at least 2048"),
    ("ed25519", "rsa-sha256", "an Ed25519 key, but rsa-sha256 needs an RSA key"),
    ("rsa", "ed25519-sha256", "an RSA key, but ed25519-sha256 needs an Ed25519 key"),
    ("ec", "rsa-sha256", "key, but rsa-sha256 needs an RSA key"),
])
async def test_bad_keys_refuse_start_up_naming_the_file(tmp_path: Path, keys: KeyMaterial, case: str,
                                                        algorithm: str, message: str) -> None:
    path = tmp_path / "dkim key.pem"
    if case == "garbage":
        path.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    elif case == "public":
        path.write_bytes(keys.rsa2048.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    elif case == "encrypted":
        path.write_bytes(keys.rsa2048.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.BestAvailableEncryption(b"pw")))
    elif case != "missing":
        key = {"short": keys.rsa1024, "ed25519": keys.ed, "rsa": keys.rsa2048,
               "ec": ec.generate_private_key(ec.SECP256R1())}[case]
        write_pem(path, key)
    plugin = DkimPlugin(DkimConfig.model_validate(
        {"domains": {"example.com": [key_entry(path, "s1", algorithm)]}}), host())
    with pytest.raises(PluginError) as caught:
        await plugin.start()
    assert str(caught.value).startswith(f"key file {path}: ")
    assert message in str(caught.value)


async def test_a_key_that_cannot_sign_refuses_start_up(tmp_path: Path, keys: KeyMaterial,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up self-test: a key the signing library cannot use (here: as without PyNaCl) stops the
    relay at start, not message by message, and leaves no signer threads behind."""
    path = write_pem(tmp_path / "k.pem", keys.ed)

    def without_nacl(*args: object, **kwargs: object) -> bytes:
        raise dkim.NaClNotFoundError("pynacl module required for ed25519 signing")

    monkeypatch.setattr(dkim, "sign", without_nacl)
    plugin = DkimPlugin(DkimConfig.model_validate(
        {"domains": {"example.com": [key_entry(path, "e1", "ed25519-sha256")]}}), host())
    with pytest.raises(PluginError, match=rf"^key file {re.escape(str(path))}: cannot sign with it "
                                          r"\(NaClNotFoundError: pynacl module required"):
        await plugin.start()
    assert plugin._executor is None and plugin.keys == {}


async def test_relay_start_up_fails_on_a_missing_key(relays: RelayFactory, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"^plugin dkim: key file {re.escape(str(missing))}: not found$"):
        await relays.start(chain={"plugins": ["dkim"]},
                           plugins={"dkim": {"domains": {"example.com": [key_entry(missing, "s1")]}}})


@pytest.mark.parametrize(("table", "message"), [
    ({"domains": {"not a domain": []}}, "plugins.dkim.domains"),
    ({"domains": {"example.com": []}}, "has no keys"),
    ({"domains": {"example.com": [{"selector": "bad selector!", "key_file": "/k"}]}}, "invalid selector"),
    ({"domains": {"example.com": [{"selector": "s", "key_file": "/k", "algorithm": "rsa-sha1"}]}}, "algorithm"),
    ({"domains": {"Example.com": [{"selector": "s", "key_file": "/k"}],
                  "example.com.": [{"selector": "s", "key_file": "/k"}]}}, "listed twice"),
    ({"headers": ["To", "Subject"]}, "headers must include From"),
    ({"headers": ["From", "Received"]}, "Received must not be signed"),
    ({"oversign": ["DKIM-Signature"]}, "DKIM-Signature must not be signed"),
    ({"default_domain": "example.net"}, "default_domain 'example.net' has no keys"),
    ({"keys": []}, "plugins.dkim.keys: unknown key"),
])
def test_configuration_errors_are_clear(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Chain.from_settings(["dkim"], {"dkim": table}, host())


def test_configured_domains_are_normalised(tmp_path: Path) -> None:
    config = DkimConfig.model_validate({"domains": {"Bücher.Example.": [{"selector": "S1", "key_file": "/k"}]}})
    assert list(config.domains) == ["xn--bcher-kva.example"]
    assert config.domains["xn--bcher-kva.example"][0].selector == "s1"


# -- relay dkim keygen -----------------------------------------------------------------------------------
@dataclass
class KeygenOutput:
    key_file: Path
    zone_line: str
    toml: dict[str, Any]


def run_keygen(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = relay_main(["dkim", "keygen", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def parse_keygen(out: str) -> KeygenOutput:
    lines = out.splitlines()
    zone_line = next(line for line in lines if " IN TXT " in line)
    snippet = "\n".join(lines[lines.index(next(line for line in lines if line.startswith("[[plugins.dkim"))):])
    toml = tomllib.loads(snippet)
    key_file = Path(re.match(r"wrote (\S+) ", lines[0]).group(1))  # type: ignore[union-attr]
    return KeygenOutput(key_file, zone_line, toml)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_keygen_writes_a_private_key_and_the_record_that_verifies_it(
        algorithm: str, tmp_path: Path, dns_server: DnsTestServer, capsys: pytest.CaptureFixture[str],
        plugins: list[DkimPlugin]) -> None:
    out_dir = tmp_path / "dkim"
    status, out, err = run_keygen(capsys, "--domain", "Example.COM", "--selector", "k2026",
                                  "--algorithm", algorithm, "--out", str(out_dir))
    assert status == 0, err
    result = parse_keygen(out)
    assert result.key_file == out_dir / "example.com.k2026.pem"
    assert stat.S_IMODE(result.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o700
    assert "PRIVATE KEY" not in out
    assert result.zone_line.startswith("k2026._domainkey.example.com. IN TXT \"v=DKIM1; k=" + algorithm + "; p=")
    strings = re.findall(r'"([^"]*)"', result.zone_line)
    assert all(len(s) <= 255 for s in strings)
    assert len(strings) == (2 if algorithm == "rsa" else 1)      # a 2048-bit RSA record needs two strings
    # The printed relay.toml lines are a working configuration; the printed record verifies what it signs.
    publish(dns_server, result.zone_line)
    plugin = await start_plugin(plugins, result.toml["plugins"]["dkim"])
    signed = await sign(plugin)
    assert await dkimpy_verify(signed, dns_server) == [True]
    report = await mail_dkim_verify(signed, dns_server)
    if algorithm == "rsa":
        assert report.signatures[0]["result"] == "pass"
    else:
        assert mail_dkim_ed25519_ok(report.signatures[0])


async def test_keygen_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--domain", "example.com", "--selector", "s1", "--algorithm", "ed25519", "--out", str(tmp_path))
    assert run_keygen(capsys, *args)[0] == 0
    key_file = tmp_path / "example.com.s1.pem"
    before = key_file.read_bytes()
    status, _, err = run_keygen(capsys, *args)
    assert status == 1 and "exists; use --force" in err
    assert key_file.read_bytes() == before
    assert run_keygen(capsys, *args, "--force")[0] == 0
    assert key_file.read_bytes() != before
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.com.s1.pem"]   # no temporary left


@pytest.mark.parametrize(("args", "message"), [
    (("--bits", "1024"), "RSA keys need at least 2048 bits"),
    (("--algorithm", "ed25519", "--bits", "2048"), "--bits applies to RSA keys only"),
    (("--selector", "no/slash"), "invalid selector"),
])
def test_keygen_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                      message: str) -> None:
    base = {"--domain": "example.com", "--selector": "s1", "--out": str(tmp_path)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    status, _, err = run_keygen(capsys, *[item for pair in base.items() for item in pair])
    assert status == 2 and message in err
    assert list(tmp_path.iterdir()) == []


# -- chain order -----------------------------------------------------------------------------------------
class BodyStamper(Plugin[PluginConfig]):
    """Changes the body before each attempt: must not run after a seal."""

    name: ClassVar[str] = "body-stamper"
    modifies: ClassVar[frozenset[Literal["headers", "body"]]] = frozenset({"body"})

    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        ctx.data += b"-- stamped\r\n"
        return CONTINUE


class DataFooter(Plugin[PluginConfig]):
    """Changes the message at DATA, which is always before any attempt, wherever it is in the chain."""

    name: ClassVar[str] = "data-footer"
    modifies: ClassVar[frozenset[Literal["headers", "body"]]] = frozenset({"body"})

    async def data(self, ctx: DataContext) -> Verdict:
        ctx.data += b"-- footer\r\n"
        return CONTINUE


async def test_a_body_changing_plugin_after_dkim_refuses_start_up(relays: RelayFactory, tmp_path: Path,
                                                                 keys: KeyMaterial) -> None:
    path = write_pem(tmp_path / "k.pem", keys.rsa2048)
    with pytest.raises(ConfigError) as caught:
        await relays.start(chain={"plugins": ["dkim", "tests.test_dkim:BodyStamper"]},
                           plugins={"dkim": {"domains": {"example.com": [key_entry(path, "s1")]}}})
    assert str(caught.value) == ("chain.plugins: 'body-stamper' changes the message (body) after 'dkim' sealed it; "
                                 "put it before 'dkim'")


async def test_message_changers_before_dkim_or_at_data_are_accepted(tmp_path: Path, keys: KeyMaterial) -> None:
    path = write_pem(tmp_path / "k.pem", keys.rsa2048)
    tables = {"dkim": {"domains": {"example.com": [key_entry(path, "s1")]}}}
    chain = Chain.from_settings(["tests.test_dkim:BodyStamper", "dkim", "tests.test_dkim:DataFooter"], tables,
                                host())
    assert chain.effective()["before_attempt"] == ["body-stamper", "dkim"]
    # dkim itself may follow another sealing step: a DKIM-Signature breaks no earlier signature.
    assert DkimPlugin.seals and not DkimPlugin.modifies


# -- end to end ------------------------------------------------------------------------------------------
async def test_a_message_relayed_end_to_end_arrives_signed(relays: RelayFactory, tmp_path: Path,
                                                           dns_server: DnsTestServer, keys: KeyMaterial) -> None:
    rsa_path = install_key(tmp_path, dns_server, "example.com", "s2026", keys.rsa2048)
    ed_path = install_key(tmp_path, dns_server, "example.com", "e2026", keys.ed)
    async with SinkServer(SinkConfig(starttls="off")) as sink:
        running = await relays.start(
            server={"role": "all"},
            chain={"plugins": ["dkim"]},
            plugins={"dkim": {"domains": {"example.com": [key_entry(rsa_path, "s2026"),
                                                          key_entry(ed_path, "e2026", "ed25519-sha256")]}}},
            delivery={"routes": {"default": {"kind": "host", "host": "127.0.0.1", "port": sink.port,
                                             "tls": "none"}}})
        client = await RawClient.connect(running.ports["relay"], "127.0.0.1")
        assert (await client.greeting()).code == 220
        await client.ehlo()
        reply = await client.mail("alice@example.com", ["bob@example.org"], MESSAGE)
        assert reply.code == 250, reply
        queue_id = reply.text.rsplit(" ", 1)[1]
        await client.close()
        [received] = await sink.wait_for_messages(1, timeout=30)
    assert received.rcpt_tos == ["bob@example.org"]
    assert received.data.startswith(b"DKIM-Signature: ") and received.data.count(b"DKIM-Signature:") == 2
    assert await dkimpy_verify(received.data, dns_server) == [True, True]
    report = await mail_dkim_verify(received.data, dns_server)
    assert report.by_algorithm("rsa-sha256")["result"] == "pass"
    assert mail_dkim_ed25519_ok(report.by_algorithm("ed25519-sha256"))
    # The queue keeps the unsigned message: a later attempt would sign it afresh.
    kept = await running.store.message_data(queue_id)
    assert kept is not None and b"DKIM-Signature" not in kept


def test_the_example_configuration_documents_the_defaults() -> None:
    """relay.toml.example's commented [plugins.dkim] block parses, validates and states the real defaults."""
    text = (Path(__file__).parent.parent / "relay.toml.example").read_text()
    block = text[text.index("# [plugins.dkim]"):]
    block = block[:block.index("\n\n")]
    code = [line[2:] for line in block.splitlines()
            if re.match(r"# (\[plugins\.dkim\]|[a-z_]+ = |\s|\]|\})", line)]
    table = tomllib.loads("\n".join(code))["plugins"]["dkim"]
    config = DkimConfig.model_validate(table)
    defaults = DkimConfig()
    assert (config.headers, config.oversign, config.default_domain) == (
        defaults.headers, defaults.oversign, defaults.default_domain)
    assert [k.algorithm for k in config.domains["example.com"]] == ["rsa-sha256", "ed25519-sha256"]
