"""TLS interop with real QEMUs (``tls-creds-x509``, issue 20): QEMU 7.2 and 10.0 into the
engine and the engine into them, ``none`` and ``zstd``, several channels, byte-exact. QEMU reads
the same creds directories the engine does (``scripts/tls_creds.py`` makes them per run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qemu_support import (  # noqa: F401 - ram_image is a fixture
    Image, compare_pages, engine_into_qemu, qemu_binary, qemu_into_engine, qemu_peer, ram_image, requires_qemu,
)
from support import ROOT, read_dump

sys.path.insert(0, str(ROOT / "scripts"))
import tls_creds  # noqa: E402

pytestmark = requires_qemu

CASES = [("7.2", "none", 4), ("7.2", "zstd", 2), ("10.0", "none", 4), ("10.0", "zstd", 3)]


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_creds.make_pair(tmp_path_factory.mktemp("qemu-pki"))


def _tls_object(directory: Path, endpoint: str) -> list[str]:
    return ["-object", f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint}"]


@pytest.mark.parametrize("version,method,channels", CASES, ids=[f"{v}-{m}-{c}" for v, m, c in CASES])
def test_qemu_into_engine_with_tls(tmp_path: Path, ram_image: Image, creds: tuple[Path, Path], version: str,
                                   method: str, channels: int) -> None:
    image, raw = ram_image
    server, client = creds
    dn = tls_creds.dn_of(client, "client")
    dump = tmp_path / "dst"
    dst, _ = qemu_into_engine(tmp_path, image, method, channels, dump, binary=qemu_binary(version),
                              qemu_args=_tls_object(client, "client"), qemu_params={"tls_creds": "tls0"},
                              engine_args=["--tls-creds", str(server), "--tls-authz", dn])
    compare_pages("ram", read_dump(dump)["ram"], raw)
    assert dst.json()["status"] == "completed"


@pytest.mark.parametrize("version,method,channels", CASES, ids=[f"{v}-{m}-{c}" for v, m, c in CASES])
def test_engine_into_qemu_with_tls(tmp_path: Path, ram_image: Image, creds: tuple[Path, Path], version: str,
                                   method: str, channels: int) -> None:
    image, raw = ram_image
    server, client = creds
    compat = ["--compat", "10.0"] if version == "10.0" else []
    _, got = engine_into_qemu(tmp_path, image, method, channels, "--tls-creds", str(client), *compat,
                              binary=qemu_binary(version), qemu_args=_tls_object(server, "server"),
                              qemu_params={"tls_creds": "tls0"})
    compare_pages("ram", got, raw)


def test_qemu_refuses_an_engine_from_another_ca(tmp_path: Path, ram_image: Image, creds: tuple[Path, Path]) -> None:
    """QEMU 7.2's destination verifies the engine's certificate: one from another CA fails the
    engine's own check of QEMU's certificate first, in one line, and QEMU receives nothing."""
    from support import run_engine

    image, _ = ram_image
    server, _ = creds
    other = tls_creds.Authority.create("another CA").issue(tmp_path / "other", "client", "source.example.com")
    peer, uri = qemu_peer.destination(tmp_path, memory="64M", channels=2, extra_args=_tls_object(server, "server"),
                                      parameters={"tls_creds": "tls0"})
    with peer:
        r = run_engine("migrate", uri, "--ram-image", f"ram={image}", "--channels", "2", "--tls-creds", str(other),
                       timeout=30)
        assert r.returncode == 1
        assert r.stderr.strip() == (f"engine: error: main channel to {uri}: TLS handshake failed: the peer's"
                                    " certificate is not valid: unable to get local issuer certificate")
        assert peer.status() == "inmigrate"
