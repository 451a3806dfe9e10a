"""``relay dkim keygen``: make a DKIM signing key, and say what to publish in DNS and put in relay.toml.

    relay dkim keygen --domain example.com --selector s2026 [--algorithm rsa|ed25519] [--bits 2048]
                      [--out DIR] [--force]

writes ``DIR/<domain>.<selector>.pem`` (an unencrypted PKCS#8 PEM key, mode 0600) and prints the TXT
record (``<selector>._domainkey.<domain>``, the value cut into 255-octet strings as DNS requires) and the
``[plugins.dkim]`` lines that use the key.

Invariants: an existing key file is never overwritten without ``--force`` (and with it, is replaced
atomically: the old key stays whole until the new one is complete); the key file is created 0600 and
its directory 0700 when made here; the private key is never printed. Record formatting is the dkim
plugin's own (:mod:`relay.plugins.dkim`), so what keygen prints is what the plugin checks at start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

RSA_DEFAULT_BITS = 2048
ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}


def register(subparsers: Any) -> None:
    dkim_parser = subparsers.add_parser("dkim", help="DKIM signing keys")
    sub = dkim_parser.add_subparsers(dest="dkim_command", required=True)
    keygen = sub.add_parser("keygen", help="make a signing key; print its DNS record and relay.toml lines")
    keygen.add_argument("--domain", required=True, help="the signing domain (d=), e.g. example.com")
    keygen.add_argument("--selector", required=True, help="the selector (s=), e.g. s2026")
    keygen.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="rsa")
    keygen.add_argument("--bits", type=int, help=f"RSA key size (default {RSA_DEFAULT_BITS}, at least 2048)")
    keygen.add_argument("--out", default=".", help="directory for the key file (default: the current one)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from relay.plugins.dkim import MIN_RSA_BITS, normalize_domain, normalize_selector

    try:
        domain = normalize_domain(args.domain)
        selector = normalize_selector(args.selector)
        bits = _bits(args.algorithm, args.bits, MIN_RSA_BITS)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    directory = Path(args.out).absolute()
    target = directory / f"{domain}.{selector}.pem"
    if target.exists() and not args.force:
        print(f"relay: {target} exists; use --force to replace it", file=sys.stderr)
        return 1
    key = generate_key(args.algorithm, bits)
    try:
        write_private_key(target, key, replace=args.force)
    except FileExistsError:
        print(f"relay: {target} exists; use --force to replace it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(render_instructions(domain, selector, ALGORITHMS[args.algorithm], target, key, bits))
    return 0


def _bits(algorithm: str, bits: int | None, minimum: int) -> int | None:
    if algorithm == "ed25519":
        if bits is not None:
            raise ValueError("--bits applies to RSA keys only (Ed25519 keys have one size)")
        return None
    chosen = RSA_DEFAULT_BITS if bits is None else bits
    if chosen < minimum:
        raise ValueError(f"--bits {chosen}: RSA keys need at least {minimum} bits")
    if chosen > 8192:
        raise ValueError(f"--bits {chosen}: more than 8192 bits makes a record few DNS hosts accept")
    return chosen


def generate_key(algorithm: str, bits: int | None) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits or RSA_DEFAULT_BITS)


def write_private_key(target: Path, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, *,
                      replace: bool = False) -> None:
    """Write the key 0600 to a temporary file in the same directory, then move it into place: renamed
    over an old key when ``replace``, else hard-linked, which fails (FileExistsError) if a key appeared
    meanwhile — the no-overwrite promise holds even against a concurrent keygen."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if not target.parent.exists():
        target.parent.mkdir(parents=True, mode=0o700)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)   # whatever the umask
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            temporary.replace(target)
        else:
            target.hardlink_to(temporary)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def dns_record_line(selector: str, domain: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The zone-file line to publish: the name and the value cut into quoted 255-octet strings."""
    from relay.plugins.dkim import dns_record_name, public_txt_value, txt_strings
    value = public_txt_value(key.public_key())
    strings = " ".join(f'"{part}"' for part in txt_strings(value))
    return f"{dns_record_name(selector, domain)}. IN TXT {strings}"


def render_instructions(domain: str, selector: str, algorithm: str, target: Path,
                        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, bits: int | None) -> str:
    size = f"{bits} bits, " if bits else ""
    return "\n".join([
        f"wrote {target} ({algorithm}, {size}mode 0600)",
        "",
        "; DNS: publish this TXT record (the strings are joined without spaces by verifiers)",
        dns_record_line(selector, domain, key),
        "",
        '# relay.toml: put "dkim" in [chain] plugins (after every plugin that changes the message) and add',
        f"[[plugins.dkim.domains.{json.dumps(domain)}]]",
        f"selector = {json.dumps(selector)}",
        f"algorithm = {json.dumps(algorithm)}",
        f"key_file = {json.dumps(str(target))}",
    ])
