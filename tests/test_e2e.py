"""End to end: real source and destination processes, real sockets, real shared memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.compression import method_names
from support import (
    Incoming, assert_same_ram, error_lines, image_args, make_image, read_dump, run_engine,
    run_main,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    d = tmp_path_factory.mktemp("images")
    blocks = [("pc.ram", 1024, "mixed"), ("/rom@etc/acpi/tables", 32, "text"), ("pc.bios", 64, "random"),
              ("zeros", 16, "zero")]
    out = []
    for i, (name, pages, kind) in enumerate(blocks):
        path = d / f"img{i}.bin"
        make_image(path, pages, kind, seed=i)
        out.append((name, path))
    return out


def _uri(transport: str, tmp_path: Path) -> str:
    return "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"


#: the part of the matrix in the fast tier: every transport, method and channel count once
FAST_MATRIX = {("tcp", "none", 2), ("unix", "zlib", 8), ("tcp", "zstd", 1), ("unix", "lz4", 2)}


def _matrix() -> list:
    return [pytest.param(transport, method, channels,
                         marks=() if (transport, method, channels) in FAST_MATRIX else pytest.mark.slow)
            for transport in ("tcp", "unix") for method in method_names() for channels in (1, 2, 8)]


@pytest.mark.parametrize("transport, method, channels", _matrix())
def test_matrix_byte_exact(tmp_path: Path, images, transport: str, method: str, channels: int) -> None:
    common = ["--channels", str(channels), "--compression", method, "--json"]
    with Incoming(_uri(transport, tmp_path), *common, "--dump", str(tmp_path / "dst"), "--listen-timeout", "30") as dst:
        src = run_engine("migrate", dst.uri, *image_args(images), *common, "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    sj, dj = __import__("json").loads(src.stdout), dst.json()
    assert sj["status"] == dj["status"] == "completed"
    assert sj["ram"]["total"] == dj["ram"]["total"] == sum(p.stat().st_size for _, p in images)
    assert sj["ram"]["duplicate"] == dj["ram"]["duplicate"]
    assert sj["ram"]["normal"] == dj["ram"]["normal"]
    assert len(sj["channels"]) == len(dj["channels"]) == channels
    pids = [c["pid"] for c in sj["channels"]] + [c["pid"] for c in dj["channels"]]
    assert len(set(pids)) == 2 * channels  # every channel is its own process
    assert sum(c["normal_pages"] for c in dj["channels"]) == dj["ram"]["normal"]


def test_generated_guest_and_default_settings(tmp_path: Path) -> None:
    """QEMU's defaults: 2 channels, none; a generated mixed guest; human-readable summary."""
    with Incoming("tcp:127.0.0.1:0", "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "8M", "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert "source: completed" in src.stdout
    assert "destination: completed" in dst.stdout
    assert src.stdout.count("channel ") == 2
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))


@pytest.mark.parametrize("compat, syncs", [("8.0", 3), ("8.2", 3), ("9.0", 3)])
def test_every_compat_engine_to_engine(tmp_path: Path, compat: str, syncs: int) -> None:
    """The destination takes every dialect --compat speaks, with no option: EOS sync points (8.0),
    MULTIFD_FLUSH with ZERO records (8.2), MULTIFD_FLUSH with zero pages in packets (9.0)."""
    import json

    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--json", "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "4M", "--channels", "2", "--compat", compat, "--json",
                         "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    assert json.loads(src.stdout)["dialect"]["compat"] == compat
    assert json.loads(dst.stdout)["ram"]["dirty-sync-count"] == syncs


def test_compat_10_engine_to_engine(tmp_path: Path) -> None:
    """--compat 10.0: MULTIFD_FLUSH sync points, zero pages in packets, SWITCHOVER_START; the
    destination detects the dialect by itself."""
    import json

    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--json", "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "8M", "--channels", "2", "--compat", "10.0", "--json",
                         "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    out, got = json.loads(src.stdout), json.loads(dst.stdout)
    assert out["dialect"]["compat"] == "10.0" and out["dialect"]["zero-page-detection"] == "multifd"
    assert got["ram"]["dirty-sync-count"] == 3  # a sync per MULTIFD_FLUSH: setup, the pass, the end
    assert sum(c["zero_pages"] for c in got["channels"]) > 0


def test_zero_copy_send(tmp_path: Path) -> None:
    """zero-copy-send: guest pages go with MSG_ZEROCOPY, every completion is read before each
    SYNC packet, byte-exact. Over loopback the kernel copies them after all, which QEMU's
    dirty-sync-missed-zero-copy counts: at most one per channel per sync (3 syncs here)."""
    import json

    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "8M", "--channels", "2", "--zero-copy-send", "--json",
                         "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    ram = json.loads(src.stdout)["ram"]
    assert 0 <= ram["dirty-sync-missed-zero-copy"] <= 2 * (ram["dirty-sync-count"] + 1)


@pytest.mark.slow
@pytest.mark.parametrize("host", ["[::1]", "localhost"])
def test_tcp_address_forms(tmp_path: Path, host: str) -> None:
    with Incoming(f"tcp:{host}:0", "--dump", str(tmp_path / "dst")) as dst:
        port = dst.uri.rsplit(":", 1)[1]
        src = run_engine("migrate", f"tcp:{host}:{port}", "--ram-size", "1M", "--fill", "random",
                         "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))


def test_dump_manifest_names(tmp_path: Path, images) -> None:
    with Incoming("tcp:127.0.0.1:0", "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, *image_args(images))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    manifest = __import__("json").loads((tmp_path / "dst" / "manifest.json").read_text())
    assert [b["name"] for b in manifest["blocks"]] == [n for n, _ in images]
    for entry, (_, path) in zip(manifest["blocks"], images):
        assert "/" not in entry["file"]
        assert (tmp_path / "dst" / entry["file"]).read_bytes() == path.read_bytes()


def test_declared_and_preallocated_destination(tmp_path: Path) -> None:
    with Incoming("tcp:127.0.0.1:0", "--ram", "pc.ram=8M", "--prealloc", "--dump", str(tmp_path / "dst"),
                  "--trace", str(tmp_path / "dst.trace.json")) as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "8M", "--dump", str(tmp_path / "src"),
                         "--trace", str(tmp_path / "src.trace.json"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    import json

    # a pre-allocated destination receives plain packets straight into guest RAM: no separate write
    for side, names, absent in [("src", {"send", "wait for work", "zero-page detection", "sync wait"}, set()),
                                ("dst", {"recv header", "recv payload", "barrier wait"}, {"write pages"})]:
        events = json.loads((tmp_path / f"{side}.trace.json").read_text())["traceEvents"]
        spans = {e["name"] for e in events if e["ph"] == "X"}
        assert names <= spans and not absent & spans
        tracks = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
        assert len(tracks) == 3  # the main process and 2 channel processes


def test_declared_ram_must_match(tmp_path: Path) -> None:
    with Incoming("tcp:127.0.0.1:0", "--ram", "4M") as dst:
        run_engine("migrate", dst.uri, "--ram-size", "8M")
        assert dst.wait() == 1
    assert ("engine: error: main channel: received MEM_SIZE blocks [('pc.ram', 8388608)], expected the declared"
            " [('pc.ram', 4194304)]") in dst.stderr


def test_prealloc_needs_declared_ram(capsys) -> None:
    p = run_main(capsys, "incoming", "tcp:127.0.0.1:0", "--prealloc")
    assert p.returncode == 1
    assert p.stderr.strip() == "engine: error: --prealloc needs the destination's RAM blocks declared with --ram [NAME=]SIZE"


def test_stats_interval_prints_json_lines(tmp_path: Path) -> None:
    with Incoming("tcp:127.0.0.1:0", "--stats-interval", "50") as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "16M", "--max-bandwidth", "32M", "--stats-interval", "50")
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0
    import json

    lines = [json.loads(l) for l in src.stdout.splitlines() if l.startswith("{")]
    assert len(lines) >= 3 and all(l["status"] in ("setup", "active", "device", "completed") for l in lines)
    assert any(l.startswith("{") for l in dst.stdout.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "zstd"])
@pytest.mark.parametrize("mode", ["legacy", "multifd", "none"])
def test_zero_page_detection_modes(tmp_path: Path, images, mode: str, method: str) -> None:
    """zero-page-detection: legacy (ZERO records), multifd (zero_pages in packets), none."""
    common = ["--channels", "3", "--compression", method, "--json"]
    with Incoming("tcp:127.0.0.1:0", *common, "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, *image_args(images), *common, "--zero-page-detection", mode,
                         "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    sj, dj = __import__("json").loads(src.stdout), dst.json()
    total_pages = sj["ram"]["total"] // 4096
    for side in (sj, dj):
        assert side["ram"]["normal"] + side["ram"]["duplicate"] == total_pages
        in_packets = sum(c["zero_pages"] for c in side["channels"])
        assert in_packets == (side["ram"]["duplicate"] if mode == "multifd" else 0)
    assert sj["ram"]["duplicate"] == dj["ram"]["duplicate"]
    if mode == "none":
        assert sj["ram"]["duplicate"] == 0
    else:
        assert sj["ram"]["duplicate"] >= 16 + 1024 // 8  # the zero block and a share of the mixed one


@pytest.mark.slow
@pytest.mark.parametrize("packet_pages", [128, 1024])
def test_inspect_lists_zero_pages_sent_in_packets(tmp_path: Path, images, packet_pages: int) -> None:
    """An engine -> engine capture with zero-page-detection=multifd: inspect counts the zero
    pages listed in packets, and they add up with the normal ones to every page; it reads the
    header size of bigger packets from their pages_alloc."""
    from qemu_support import CaptureProxy, host_port

    common = ["--channels", "2", "--compression", "lz4", "--packet-pages", str(packet_pages)]
    with Incoming("tcp:127.0.0.1:0", *common, "--json") as dst:
        with CaptureProxy(host_port(dst.uri), tmp_path / "cap") as proxy:
            src = run_engine("migrate", proxy.uri, *image_args(images), *common, "--zero-page-detection", "multifd",
                             "--json")
            assert src.returncode == 0, src.stderr
            assert dst.wait() == 0, dst.stderr
        assert proxy.errors == []
        files = proxy.files()
    p = run_engine("inspect", *map(str, files), "--json")
    assert p.returncode == 0, p.stderr
    totals = __import__("json").loads(p.stdout)["totals"]
    sj = __import__("json").loads(src.stdout)
    assert totals["zero_pages"] == 0  # no ZERO records on the main channel
    assert totals["multifd_zero_pages"] == sj["ram"]["duplicate"] > 0
    assert totals["multifd_pages"] + totals["multifd_zero_pages"] == sj["ram"]["total"] // 4096
    human = run_engine("inspect", *map(str, files))
    assert f"{totals['multifd_zero_pages']} zero pages listed in packets" in human.stdout


@pytest.mark.slow
def test_channel_private_memory_does_not_grow_with_the_guest() -> None:
    """A channel's own memory is a few buffers: guest pages it maps (sending from them,
    receiving into them) are the guest's shared memory, not its private (anonymous) memory. A
    guest 8x larger leaves every channel's private memory where it was, far below 64 MiB."""
    import json

    private: dict[str, list[int]] = {}
    for size in ("64M", "512M"):
        common = ["--channels", "2", "--json"]
        with Incoming("tcp:127.0.0.1:0", *common, "--listen-timeout", "30") as dst:
            src = run_engine("migrate", dst.uri, "--ram-size", size, "--fill", "random", *common, timeout=120)
            assert src.returncode == 0, src.stderr
            assert dst.wait(120) == 0, dst.stderr
        channels = json.loads(src.stdout)["channels"] + json.loads(dst.stdout)["channels"]
        private[size] = [c["private-rss-kib"] for c in channels]
    assert max(private["512M"]) < 64 * 1024, private
    assert max(private["512M"]) - max(private["64M"]) < 8 * 1024, private


@pytest.mark.parametrize("pages, method, prealloc", [(512, "none", True), (1024, "zstd", False), (1024, "none", False)])
def test_bigger_packets_engine_to_engine(tmp_path: Path, images, pages: int, method: str, prealloc: bool) -> None:
    """--packet-pages on both sides: fewer, bigger packets, byte-exact; with 1024 a packet has
    more pages than one sendmsg/recvmsg takes iovecs."""
    import json

    common = ["--channels", "2", "--compression", method, "--packet-pages", str(pages), "--json"]
    ram = ["--ram", f"pc.ram={1024 * 4096}", "--ram", f"/rom@etc/acpi/tables={32 * 4096}",
           "--ram", f"pc.bios={64 * 4096}", "--ram", f"zeros={16 * 4096}", "--prealloc"] if prealloc else []
    with Incoming("tcp:127.0.0.1:0", *common, *ram, "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, *image_args(images), *common, "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    out = json.loads(src.stdout)
    assert out["packet-pages"] == pages
    # 1024 mixed pages, a quarter of them zero: with 128-page packets that would be 6 data packets
    assert sum(c["packets"] for c in out["channels"]) < 6 + 2 * 3


@pytest.mark.parametrize("src_pages, dst_pages, fill, message", [
    (512, None, "mixed", "received pages_alloc 512, expected <= 128 (an engine source with packet-pages? set the same"
                         " on both sides)"),
    (None, 256, "mixed", "received pages_alloc 128, expected 256 (packet-pages: the source must set the same; a QEMU"
                         " source sends 128)"),
    # only SYNC packets (headers shorter than the destination's): named all the same
    (None, 1024, "zero", "received pages_alloc 128, expected 1024 (packet-pages: the source must set the same; a"
                         " QEMU source sends 128)"),
])
def test_packet_pages_must_match(tmp_path: Path, src_pages: int | None, dst_pages: int | None, fill: str,
                                 message: str) -> None:
    """The header's length depends on packet-pages, so the destination names a mismatch at the first packet."""
    import re

    opt = lambda n: ["--packet-pages", str(n)] if n else []  # noqa: E731
    with Incoming("tcp:127.0.0.1:0", "--stall-timeout", "10", *opt(dst_pages)) as dst:
        run_engine("migrate", dst.uri, "--ram-size", "4M", "--fill", fill, *opt(src_pages))  # may finish into the socket buffers
        assert dst.wait() == 1
    # whichever channel's first packet is read first reports it
    (line,) = error_lines(dst.stderr)
    assert re.fullmatch(r"engine: error: multifd channel (\d) \(destination\): multifd channel \1, packet_num \d+: "
                        + re.escape(message), line), line
