"""TLS on every channel (``--tls-creds``, ``--tls-hostname``, ``--tls-authz``), QEMU's
tls-creds-x509 layout: engine <-> engine byte-exact, every refusal one line on both sides in
under 20 s with the destination's RAM untouched, and strays that do not disturb a migration.
The CA and certificates are made at run time (``scripts/tls_creds.py``); QEMU interop is in
``test_qemu_tls.py``.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import BlockSpec, GuestRam, IncomingMigration, MigrationParams, migrate
from engine.errors import ConfigError
from engine.memory.workload import fill_pages
from engine.runtime.tls import TlsCreds, authorized, peer_dn
from support import ROOT, Incoming, assert_same_ram, error_lines, make_image, read_dump, run_engine, run_main, start_source

sys.path.insert(0, str(ROOT / "scripts"))
import tls_creds  # noqa: E402

PAGES = 4096  # a 16 MiB guest


class Pki:
    """A CA, the destination's and the source's creds, and the wrong ones for each refusal."""

    def __init__(self, root: Path) -> None:
        ca = tls_creds.Authority.create()
        self.server = ca.issue(root / "server", "server", "localhost", hostnames=("localhost", "127.0.0.1", "::1"))
        self.client = ca.issue(root / "client", "client", "source.example.com")
        self.intruder = ca.issue(root / "intruder", "client", "intruder.example.com")
        self.expired = ca.issue(root / "expired", "client", "source.example.com", expired=True)
        self.expired_server = ca.issue(root / "expired-server", "server", "localhost", hostnames=("127.0.0.1",),
                                       expired=True)
        self.stranger = tls_creds.Authority.create("another CA").issue(root / "stranger", "client", "source.example.com")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls-image") / "ram.img"
    make_image(path, PAGES, "mixed", seed=3)
    return path


# ------------------------------------------------------------------ pure parts


def test_peer_dn_is_rfc4514_as_qemu_prints_it(pki: Pki) -> None:
    decoded: dict[str, Any] = ssl._ssl._test_decode_cert(str(pki.client / "client-cert.pem"))  # type: ignore[attr-defined]
    assert peer_dn(decoded) == tls_creds.dn_of(pki.client, "client")
    assert peer_dn(decoded) == "CN=source.example.com,O=Example Org,L=London,ST=London,C=GB"


def test_peer_dn_escapes_and_multivalued_rdns() -> None:
    cert = {"subject": ((("organizationName", " Acme, Inc"),), (("commonName", "a+b"), ("userId", "7")))}
    assert peer_dn(cert) == "CN=a\\+b+UID=7,O=\\ Acme\\, Inc"


def test_authz_exact_and_glob() -> None:
    dn = "CN=source.example.com,O=Example Org,C=GB"
    assert authorized(dn, [dn])
    assert authorized(dn, ["CN=other", "CN=*.example.com,O=Example Org,*"])
    assert not authorized(dn, ["CN=source.example.com"])  # exact means the whole DN
    assert not authorized(dn, ["CN=*.example.org,*"])
    assert authorized("CN=b", ["CN=?"]) and not authorized("CN=bc", ["CN=?"])
    assert not authorized("CN=a", ["CN=[ab]"]) and authorized("CN=[ab]", ["CN=[ab]"])  # GLib's globs: * and ? only


def test_creds_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tls-creds '.*/nope' is not a directory, expected one holding"
                                          r" ca-cert.pem, server-cert.pem and server-key.pem$"):
        TlsCreds.load(tmp_path / "nope", "server")
    with pytest.raises(ConfigError, match=r"has no server-cert.pem, expected ca-cert.pem, server-cert.pem and"
                                          r" server-key.pem \(as QEMU's tls-creds-x509 endpoint=server reads them\)$"):
        TlsCreds.load(pki.client, "server")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (mixed / name).write_bytes((pki.server / name).read_bytes())
    (mixed / "server-key.pem").write_bytes((pki.client / "client-key.pem").read_bytes())
    with pytest.raises(ConfigError, match=r"cannot load ca-cert.pem, server-cert.pem and server-key.pem: key values"
                                          r" mismatch$"):
        TlsCreds.load(mixed, "server")


def test_an_encrypted_key_is_refused_not_prompted_for(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    locked = tmp_path / "locked"
    locked.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (locked / name).write_bytes((pki.server / name).read_bytes())
    key = serialization.load_pem_private_key((pki.server / "server-key.pem").read_bytes(), None)
    (locked / "server-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match=r"server-key.pem is encrypted; it needs a key without a passphrase"):
        TlsCreds.load(locked, "server")


def test_a_bad_tls_hostname_is_one_line(pki: Pki, capsys: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        p = run_main(capsys, "migrate", f"tcp:127.0.0.1:{port}", "--ram-size", "1M", "--tls-creds", str(pki.client),
                     "--tls-hostname", "a..b")
    assert p.returncode != 0
    assert error_lines(p.stderr) == ["engine: error: tls-hostname 'a..b' is not a valid host name or address"]


def test_params_checks() -> None:
    with pytest.raises(ConfigError, match="^tls-hostname 'h' needs tls-creds"):
        MigrationParams(tls_hostname="h")
    with pytest.raises(ConfigError, match=r"^tls-authz \('CN=x',\) needs tls-creds"):
        MigrationParams(tls_authz=("CN=x",))
    with pytest.raises(ConfigError, match="^zero-copy-send is not available with tls-creds"):
        MigrationParams(tls_creds="/d", zero_copy_send=True)


def test_unix_uri_needs_tls_hostname(pki: Pki, tmp_path: Path, capsys: Any) -> None:
    p = run_main(capsys, "migrate", f"unix:{tmp_path}/sock", "--ram-size", "1M", "--tls-creds", str(pki.client))
    assert p.returncode != 0
    assert error_lines(p.stderr) == [
        f"engine: error: tls-creds with 'unix:{tmp_path}/sock' needs tls-hostname: a unix: URI has no host name"
        " to check the destination's certificate against"]


def test_snapshot_files_take_no_tls(pki: Pki, tmp_path: Path, capsys: Any) -> None:
    p = run_main(capsys, "migrate", f"file:{tmp_path}/g.snap", "--ram-size", "1M", "--tls-creds", str(pki.client))
    assert p.returncode != 0 and not (tmp_path / "g.snap").exists()
    assert error_lines(p.stderr) == [f"engine: error: --tls-creds secures tcp: and unix: migrations;"
                                      f" 'file:{tmp_path}/g.snap' is a snapshot file, which is not encrypted"]


# ------------------------------------------------------------------ migrations


def test_python_api_with_tls(pki: Pki) -> None:
    """Both sides as objects in one process: the MigrationParams fields are the CLI's options."""
    dst_params = MigrationParams(channels=2, tls_creds=str(pki.server), tls_authz=("CN=source.example.com,*",))
    src_params = MigrationParams(channels=2, tls_creds=str(pki.client), tls_hostname="localhost")
    with GuestRam.create([BlockSpec("pc.ram", 8 << 20)]) as ram, \
            IncomingMigration("tcp:127.0.0.1:0", dst_params) as dst:
        fill_pages(ram.blocks[0], "mixed")
        assert dst.uri is not None
        migrate(dst.uri, ram, src_params, timeout=60)
        result = dst.wait(60)
        assert result.ram is not None
        assert np.array_equal(ram.blocks[0].pages, result.ram.blocks[0].pages)


@pytest.mark.parametrize("method,channels,transport", [("none", 4, "tcp"), ("zstd", 2, "tcp"), ("none", 2, "unix")])
def test_engine_to_engine_byte_exact(pki: Pki, image: Path, tmp_path: Path, method: str, channels: int,
                                     transport: str) -> None:
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    common = ["--channels", str(channels), "--compression", method]
    host = ["--tls-hostname", "localhost"] if transport == "unix" else []
    with Incoming(uri, *common, "--tls-creds", str(pki.server), "--tls-authz", "CN=source.example.com,*",
                  "--dump", str(tmp_path / "dst"), "--json") as dst:
        src = run_engine("migrate", dst.uri, "--ram-image", f"ram={image}", *common, "--tls-creds", str(pki.client),
                         *host, "--dump", str(tmp_path / "src"))
        assert dst.wait(60) == 0, dst.stderr
        assert src.returncode == 0, src.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    assert dst.json()["ram"]["normal"] > 0


@pytest.mark.slow
def test_preallocated_destination_with_tls(pki: Pki, image: Path, tmp_path: Path) -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "3", "--tls-creds", str(pki.server), "--ram", "ram=16M",
                  "--prealloc", "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, "--ram-image", f"ram={image}", "--channels", "3",
                         "--tls-creds", str(pki.client), "--dump", str(tmp_path / "src"))
        assert dst.wait(60) == 0, dst.stderr
        assert src.returncode == 0, src.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))


def test_strays_do_not_disturb_a_tls_migration(pki: Pki, image: Path, tmp_path: Path) -> None:
    """A silent scanner, a plain-text migration client and a client of another CA connect
    first; the TLS migration that follows completes byte-exact and the destination logs each."""
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--tls-creds", str(pki.server), "--handshake-timeout", "3",
                  "--dump", str(tmp_path / "dst")) as dst:
        port = int(dst.uri.rsplit(":", 1)[1])
        scanner = socket.create_connection(("127.0.0.1", port), timeout=10)
        reset = socket.create_connection(("127.0.0.1", port), timeout=10)  # a connect scan: reset at once
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        plain = socket.create_connection(("127.0.0.1", port), timeout=10)
        plain.sendall(b"QEVM\x00\x00\x00\x03")
        ctx = ssl.create_default_context(cafile=str(pki.server / "ca-cert.pem"))
        ctx.load_cert_chain(str(pki.stranger / "client-cert.pem"), str(pki.stranger / "client-key.pem"))
        stranger = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                   server_hostname="127.0.0.1")
        try:
            src = run_engine("migrate", dst.uri, "--ram-image", f"ram={image}", "--channels", "2",
                             "--tls-creds", str(pki.client), "--dump", str(tmp_path / "src"))
            assert src.returncode == 0, src.stderr
            assert dst.wait(60) == 0, dst.stderr
        finally:
            for s in (scanner, plain, stranger):
                s.close()
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    assert "the peer does not speak TLS (a plain-text migration? both sides need tls-creds)" in dst.stderr
    assert "the peer's certificate is not valid: unable to get local issuer certificate" in dst.stderr


# ------------------------------------------------------------------ refusals

REFUSALS = {
    # case: (destination options, source options, the source's error, the destination's log)
    "plain source": ([], None, None, "the peer does not speak TLS (a plain-text migration? both sides need tls-creds)"),
    "another CA": ([], "stranger", "main channel to {uri}: TLS handshake failed: the peer's certificate is not"
                   " valid: self-signed certificate in certificate chain", "the peer refused the TLS session (alert: unknown ca)"),
    "hostname": ([], "client --tls-hostname wrong.example.com", "main channel to {uri}: TLS handshake failed: the"
                 " peer's certificate is not valid: Hostname mismatch, certificate is not valid for"
                 " 'wrong.example.com'.", "the peer refused the TLS session (alert: bad certificate)"),
    "authz": (["--tls-authz", "CN=source.example.com,*"], "intruder", None,
              "client certificate 'CN=intruder.example.com,O=Example Org,L=London,ST=London,C=GB' is not in"
              " tls-authz"),
    "expired client": ([], "expired", None, "the peer's certificate is not valid: certificate has expired"),
    "expired server": (["expired-server"], "client", "main channel to {uri}: TLS handshake failed: the peer's"
                       " certificate is not valid: certificate has expired",
                       "the peer refused the TLS session (alert: certificate expired)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(pki: Pki, image: Path, case: str) -> None:
    dst_opts, src_opts, src_error, dst_log = REFUSALS[case]
    server = pki.expired_server if dst_opts[:1] == ["expired-server"] else pki.server
    dst_opts = [o for o in dst_opts if o != "expired-server"]
    t0 = time.monotonic()
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--tls-creds", str(server), *dst_opts,
                  "--listen-timeout", "6", "--dump", "/nonexistent/never-written") as dst:
        args: list[str] = []
        if src_opts is not None:
            name, *more = src_opts.split()
            args = ["--tls-creds", str(getattr(pki, name)), *more]
        src = start_source(dst.uri, "--ram-size", "64M", "--channels", "2", *args)
        _, src_err = src.communicate(timeout=20)
        assert dst.wait(20) == 1
    assert time.monotonic() - t0 < 20
    assert src.returncode == 1, src_err
    lines = error_lines(src_err)
    assert len(lines) == 1, src_err
    if src_error is not None:
        assert lines[0] == "engine: error: " + src_error.format(uri=dst.uri)
    # the destination refused every connection with the reason, received nothing, and says so
    assert f": {dst_log}" in dst.stderr, dst.stderr
    dst_lines = error_lines(dst.stderr)
    assert len(dst_lines) == 1 and dst_lines[0].startswith("engine: error: no migration arrived within 6s;"), dst.stderr
    assert f"refused, the last: {dst_log}" in dst_lines[0]


@pytest.mark.slow
def test_tls_source_to_plain_destination(pki: Pki) -> None:
    t0 = time.monotonic()
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--listen-timeout", "5") as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "16M", "--channels", "2", "--tls-creds", str(pki.client),
                         timeout=20)
        assert dst.wait(20) == 1
    assert time.monotonic() - t0 < 20
    assert error_lines(src.stderr) == [
        f"engine: error: main channel to {dst.uri}: TLS handshake failed: the peer closed the connection during the"
        " TLS handshake (does it use TLS, with our CA?)"]
    assert "dropped a TLS connection: this destination has no tls-creds (plain text)" in dst.stderr
