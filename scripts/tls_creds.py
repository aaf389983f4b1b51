#!/usr/bin/env python3
"""Make throw-away TLS credentials in QEMU's tls-creds-x509 layout (for tests and benchmarks).

    python scripts/tls_creds.py DIR [--hostname NAME ...] [--client-cn NAME] [--force]

writes ``DIR/server`` (ca-cert.pem, server-cert.pem, server-key.pem) and ``DIR/client``
(ca-cert.pem, client-cert.pem, client-key.pem), signed by a new CA whose key is kept in
``DIR/ca``: give ``--tls-creds DIR/server`` to a destination and ``DIR/client`` to a source,
or the same directories to QEMU's ``-object tls-creds-x509,dir=...,endpoint=...``. Keys are
ECDSA P-256, certificates carry the key usages QEMU's sanity checks ask for. Never use these
for anything but testing: the keys are written unencrypted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ONE_DAY = dt.timedelta(days=1)


@dataclass
class Authority:
    """A CA that signs leaf certificates."""

    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "multifd-engine test CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(common_name)
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - ONE_DAY)
                .not_valid_after(now + 365 * ONE_DAY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(name, key, cert)

    def issue(self, directory: Path, endpoint: str, common_name: str, *, hostnames: Sequence[str] = (),
              expired: bool = False) -> Path:
        """Write ``directory`` with ca-cert.pem and the endpoint's certificate and key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = (now - 30 * ONE_DAY, now - ONE_DAY) if expired else (now - ONE_DAY, now + 365 * ONE_DAY)
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if endpoint == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=True, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([purpose]), critical=True))
        if hostnames:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hostnames]),
                                            critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca-cert.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{endpoint}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / f"{endpoint}-key.pem", key)
        return directory

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca-cert.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / "ca-key.pem", self.key)


def _write_key(path: Path, key: Any) -> None:
    """An unencrypted PKCS#8 PEM key that only its owner can read (as QEMU's docs ask)."""
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "London"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "London"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def dn_of(directory: Path, endpoint: str) -> str:
    """The RFC 4514 subject of an endpoint's certificate, as tls-authz matches it."""
    cert = x509.load_pem_x509_certificate((directory / f"{endpoint}-cert.pem").read_bytes())
    return cert.subject.rfc4514_string()


def make_pair(directory: Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
              client_cn: str = "source.example.com") -> tuple[Path, Path]:
    """``directory/server`` and ``directory/client`` signed by one new CA (kept in ``directory/ca``)."""
    ca = Authority.create()
    ca.save(directory / "ca")
    server = ca.issue(directory / "server", "server", hostnames[0], hostnames=hostnames)
    client = ca.issue(directory / "client", "client", client_cn)
    return server, client


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--hostname", action="append", default=None,
                   help="a name or address for the server certificate (repeatable; default localhost, 127.0.0.1, ::1)")
    p.add_argument("--client-cn", default="source.example.com", help="the client certificate's CN")
    p.add_argument("--force", action="store_true", help="replace DIRECTORY's server, client and ca folders")
    args = p.parse_args(argv)
    parts = [args.directory / n for n in ("server", "client", "ca")]
    if any(d.exists() for d in parts):
        if not args.force:
            print(f"tls_creds: {args.directory} already holds credentials (--force replaces them)", file=sys.stderr)
            return 2
        for d in parts:
            shutil.rmtree(d, ignore_errors=True)
    server, client = make_pair(args.directory, args.hostname or ("localhost", "127.0.0.1", "::1"), args.client_cn)
    print(f"destination: --tls-creds {server}\nsource:      --tls-creds {client}  (DN {dn_of(client, 'client')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
