"""Coverage-guided fuzzing of the destination's parsers with atheris (optional; not run in CI).

    .venv/bin/pip install atheris
    .venv/bin/python scripts/fuzz_atheris.py stream tests/fuzz_corpus/stream -runs=200000
    .venv/bin/python scripts/fuzz_atheris.py packet tests/fuzz_corpus/packet -max_total_time=600
    .venv/bin/python scripts/fuzz_atheris.py handshake tests/fuzz_corpus/handshake

Any exception other than the engine's own MigrationError is a finding (atheris stops and writes
the crashing input). The corpus directories hold small seeds made by --make-seeds; libFuzzer
adds what it finds there.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_seeds() -> None:
    import numpy as np

    from engine.wire.encoder import StreamEncoder
    from engine.wire.packet import MULTIFD_FLAG_SYNC, MultiFDInit, encode_packet_header

    corpus = ROOT / "tests" / "fuzz_corpus"
    enc = StreamEncoder()
    enc.header()
    enc.configuration("none")
    enc.section_start(2, "ram", 0, 4)
    enc.ram_mem_size([("pc.ram", 4 * 4096), ("rom", 4096)])
    enc.ram_eos()
    enc.footer(2)
    enc.section_part(2)
    enc.ram_zero_pages("pc.ram", np.array([0, 4096, 12288]))
    enc.ram_page("rom", 0, bytes(range(256)) * 16)
    enc.ram_eos()
    enc.footer(2)
    enc.section_part(2, end=True)
    enc.ram_eos()
    enc.footer(2)
    enc.eof()
    seeds = {
        "stream/valid": bytes(enc.out),
        "handshake/channel0": MultiFDInit(0).pack(),
        "handshake/channel1-uuid": MultiFDInit(1, bytes(range(16))).pack(),
        "packet/sync": encode_packet_header(flags=MULTIFD_FLAG_SYNC, packet_num=1),
        "packet/data": encode_packet_header(flags=0, packet_num=4, ramblock=b"pc.ram",
                                            offsets=np.array([0, 4096]), next_packet_size=8192),
    }
    for name, data in seeds.items():
        path = corpus / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path} ({len(data)} bytes)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--make-seeds":
        make_seeds()
        return
    import atheris

    with atheris.instrument_imports():
        from engine.errors import MigrationError
        from engine.wire.packet import MultiFDInit, decode_packet_header, validate_init
        from test_fuzz import apply_stream

    target = sys.argv.pop(1) if len(sys.argv) > 1 else "stream"

    def one(data: bytes) -> None:
        try:
            if target == "stream":
                apply_stream(data, 61)
            elif target == "packet":
                if len(data) >= 1344:
                    decode_packet_header(data[:1344], channel=0, expected_compression=0,
                                         blocks={"pc.ram": 16 * 4096, "rom": 4096})
            else:
                if len(data) >= 64:
                    validate_init(MultiFDInit.unpack(data[:64]), expected_uuid=bytes(16), channels=4)
        except MigrationError:
            pass

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
