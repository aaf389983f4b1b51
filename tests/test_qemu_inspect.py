"""``python -m engine inspect`` on streams captured from real QEMU runs (captured here, at test
time, never committed): a main stream written by QEMU to ``exec:cat``, and the main and multifd
channel bytes of a multifd migration recorded by scripts/capture_proxy.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qemu_support import (
    NONE_PAGES,
    CaptureProxy,
    QemuPeer,
    assert_error,
    compare_pages,
    host_port,
    incoming,
    qemu_peer,
    Image,
    ram_image,  # noqa: F401 - fixture
    needs_qemu,
)
from support import read_dump, run_engine, run_main


#: bytes/s: QEMU cuts a ram section at each 100 ms rate-limit window, and at this rate ~45 MB of
#: pages are more than the 300 ms downtime-limit allows in one go, so several PART sections
#: come before END, and each one after the first opens with a CONTINUE record (about 1 s)
RATE = 50_000_000


def _zero_pages(raw: bytes) -> int:
    return int((~np.frombuffer(raw, np.uint64).reshape(-1, 512).any(axis=1)).sum())


@pytest.fixture(scope="module")
def exec_capture(tmp_path_factory: pytest.TempPathFactory, ram_image: Image) -> Path:
    """QEMU ``-M none`` with the image, migrated without multifd into a file."""
    image, _ = ram_image
    d = tmp_path_factory.mktemp("exec-capture")
    out = d / "main.bin"
    with QemuPeer(d, name="src", mem_path=image) as src:
        src.set_parameters(max_bandwidth=RATE)
        src.migrate(f"exec:cat > {out}")
        assert src.wait_migration(timeout=60)["status"] == "completed"
    return out


@pytest.fixture(scope="module")
def multifd_capture(tmp_path_factory: pytest.TempPathFactory, ram_image: Image) -> list[Path]:
    """QEMU source -> capture proxy -> engine destination, zlib, 3 channels."""
    image, raw = ram_image
    d = tmp_path_factory.mktemp("multifd-capture")
    with qemu_peer.source(d, ram_image=image, channels=3, compression="zlib") as src:
        src.set_parameters(max_bandwidth=RATE)
        with incoming("--channels", "3", "--compression", "zlib", "--dump", str(d / "dst")) as dst:
            with CaptureProxy(host_port(dst.uri), d / "cap") as proxy:
                src.migrate(proxy.uri)
                assert src.wait_migration(timeout=60)["status"] == "completed"
                assert dst.wait(60) == 0, dst.stderr
            assert proxy.errors == []
            files = proxy.files()
    compare_pages("ram through the proxy", read_dump(d / "dst")["ram"], raw)
    assert len(files) == 4
    return files


@needs_qemu
def test_main_stream(exec_capture: Path, ram_image: Image) -> None:
    _, raw = ram_image
    zero = _zero_pages(raw)
    r = run_engine("inspect", "--json", str(exec_capture))
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)["files"][0]
    assert f["kind"] == "main" and f["version"] == 3 and f["machine"] == "none"
    assert f["blocks"] == [{"name": "ram", "size": 64 << 20}]
    ram = f["sections"]["ram"]
    assert ram["START"] == 1 and ram["END"] == 1 and ram.get("PART", 0) >= 2
    assert f["sections_opening_with_continue"] >= 1  # CONTINUE state carried across sections
    assert f["ram_records"] == {"mem_size": 1, "zero_pages": zero, "page": NONE_PAGES - zero,
                                "eos": sum(ram.values())}  # one EOS per ram section
    assert f["ram_pages_by_block"] == {"ram": {"zero": zero, "page": NONE_PAGES - zero}}
    assert [d["name"] for d in f["device_sections"]] == ["timer", "globalstate"]
    assert f["sections"]["devices"] == {"FULL": 2}
    assert f["eof"] and f["vmdesc"] and f["truncated"] is None
    pb = f["part_bytes"]
    assert sum(pb.values()) == f["bytes"] == exec_capture.stat().st_size

    text = run_engine("inspect", str(exec_capture))
    assert text.returncode == 0, text.stderr
    assert f"ZERO {zero} pages, PAGE {NONE_PAGES - zero}," in text.stdout
    assert "device sections (2): timer(24), globalstate(104)" in text.stdout


@needs_qemu
def test_multifd_channels(multifd_capture: list[Path], ram_image: Image) -> None:
    _, raw = ram_image
    zero = _zero_pages(raw)
    r = run_engine("inspect", "--json", *map(str, multifd_capture))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    main, *chans = report["files"]
    assert main["kind"] == "main" and main["ram_records"]["page"] == 0  # multifd: no PAGE records on main
    assert main["ram_records"]["zero_pages"] == zero
    assert main["sections_opening_with_continue"] >= 1
    assert sorted(c["channel"] for c in chans) == [0, 1, 2]
    for c in chans:
        assert c["kind"] == "multifd" and c["uuid"] == "00000000-0000-0000-0000-000000000000"
        assert c["compression"] == ["zlib"] and c["payload_check"] == "ok" and c["truncated"] is None
        assert c["syncs"] == main["ram_records"]["eos"]
        assert set(c["flags"]) <= {"0x0", "0x1", "0x2", "0x3"}  # empty, SYNC, zlib, zlib|SYNC
        # each merged data+SYNC packet is followed by an empty one (flags 0), except possibly
        # the last: at completion the channel can be shut down before it sends that packet
        assert c["flags"].get("0x0", 0) == c["empty_packets"]
        assert 0 <= c["merged_sync_packets"] - c["empty_packets"] <= 1
        assert c["packets"] == c["data_packets"] + c["sync_packets"] + c["merged_sync_packets"] + c["empty_packets"]
        assert c["header_bytes"] == 1344 * c["packets"]
        assert c["bytes"] == 64 + c["header_bytes"] + c["payload_bytes"]
        assert c["packet_num"]["first"] == c["channel"]  # the setup syncs take packet_num 0..N-1
    # every channel carried pages, so its later SYNC packets hold stale ramblock/next_packet_size
    assert all(c["stale_empty_packets"] >= 1 for c in chans)
    t = report["totals"]
    assert t["channels"] == [0, 1, 2] and t["sync_consistent"] and t["sync_rounds"] == main["ram_records"]["eos"]
    # every non-zero page once, plus what QEMU repeated (it sometimes puts the last page of a
    # full batch into the next batch too) or resent in a later round
    assert t["multifd_pages"] == (NONE_PAGES - zero + t["pages_repeated_within_round"]
                                  + t["pages_resent_in_later_round"])
    text = run_engine("inspect", *map(str, multifd_capture))
    assert text.returncode == 0
    assert "every channel has one SYNC per EOS" in text.stdout
    assert text.stdout.count("multifd channel ") == 3


@needs_qemu
def test_truncated_captures(tmp_path: Path, exec_capture: Path, multifd_capture: list[Path], capsys) -> None:
    """A capture cut mid-record (as after a cancel) is summarised up to the cut; exit status 1."""
    main = tmp_path / "main-cut.bin"
    main.write_bytes(exec_capture.read_bytes()[: exec_capture.stat().st_size // 2])
    chan = tmp_path / "chan-cut.bin"
    chan.write_bytes(multifd_capture[1].read_bytes()[:100_000])
    r = run_main(capsys, "inspect", "--json", str(main), str(chan))
    assert r.returncode == 1, r.stderr
    m, c = json.loads(r.stdout)["files"]
    assert m["truncated"].startswith("main channel: end of stream inside ") and not m["eof"]
    assert m["ram_records"]["mem_size"] == 1 and m["ram_records"]["page"] > 0
    assert "ends inside the payload" in c["truncated"] or "into a packet header" in c["truncated"]
    text = run_main(capsys, "inspect", str(main))
    assert text.returncode == 1 and "TRUNCATED:" in text.stdout


def test_not_a_capture(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    r = run_main(capsys, "inspect", str(junk))
    assert r.returncode == 1
    assert_error(r.stderr, rf"inspect: '{junk}' starts with 68656c6c, expected 5145564d \('QEVM', a main stream\)"
                           r" or 11223344 \(a multifd channel\)")
    missing = tmp_path / "missing.bin"
    r = run_main(capsys, "inspect", str(missing))
    assert r.returncode == 1
    assert_error(r.stderr, rf"inspect: cannot read '{missing}': No such file or directory")
    short = tmp_path / "short.bin"
    short.write_bytes(bytes.fromhex("11223344") + bytes(10))
    r = run_main(capsys, "inspect", str(short))
    assert r.returncode == 1
    assert_error(r.stderr, rf"inspect: {short}: received 14 bytes, expected a 64-byte multifd handshake")
