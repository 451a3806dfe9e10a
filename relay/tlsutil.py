"""TLS contexts for the listeners, and the development certificate of the zero-setup default.

With no certificate configured (and ``tls.dev_certificate`` on, the default) the relay generates a
self-signed certificate for ``server.hostname`` under ``<state_dir>/tls/`` once and reuses it. It is for
development: clients must skip verification (``swaks -tls`` does). Production configures real files.

Invariants: server contexts never accept less than TLS 1.2 (``tls.min_version``), do not ask for client
certificates, and the private key file is written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.settings import ConfigError, ListenerSettings, Settings

_MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def dev_certificate_paths(settings: Settings) -> tuple[Path, Path]:
    base = settings.server.state_dir / "tls"
    return base / "dev-cert.pem", base / "dev-key.pem"


def ensure_dev_certificate(settings: Settings) -> tuple[Path, Path]:
    """Create the self-signed development certificate if it does not exist yet."""
    cert_path, key_path = dev_certificate_paths(settings)
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, settings.server.hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(settings.server.hostname), x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def certificate_for(listener: ListenerSettings, settings: Settings) -> tuple[Path, Path] | None:
    """The certificate files a listener uses, or None when it has none (no STARTTLS offered)."""
    if listener.cert_file and listener.key_file:
        return listener.cert_file, listener.key_file
    if settings.tls.cert_file and settings.tls.key_file:
        return settings.tls.cert_file, settings.tls.key_file
    if settings.tls.dev_certificate:
        return ensure_dev_certificate(settings)
    return None


def server_context(cert_file: Path, key_file: Path, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server-side context; raises :class:`ConfigError` naming the file when it cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSIONS[min_version]
    context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError:
        # ssl does not say which file (its exception has no filename): name the first one missing.
        missing = next((path for path in (cert_file, key_file) if not Path(path).is_file()), cert_file)
        raise ConfigError(f"TLS: file not found: {missing}") from None
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"TLS: cannot load certificate {cert_file} / key {key_file}: {exc}") from None
    return context


def listener_context(listener: ListenerSettings, settings: Settings) -> ssl.SSLContext | None:
    files = certificate_for(listener, settings)
    if files is None:
        if listener.kind == "smtps":
            raise ConfigError(f"listeners: {listener.name!r} is an smtps listener but has no certificate")
        return None
    return server_context(files[0], files[1], settings.tls.min_version)
