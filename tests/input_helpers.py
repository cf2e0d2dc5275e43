"""Bad inputs for the load-time checks, and the check that the command line refuses them:
exit status 2, one error line, the input files unchanged (a unique module name, as
edit_helpers)."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

from emcid.cli import main


def alias_bomb(levels: int = 8) -> str:
    """A YAML flow value of anchors nesting nine lists per level: 9**levels leaves written in
    a few hundred bytes."""
    names = "abcdefghijklmnop"[: levels + 1]
    items = ["&a [x, x, x, x, x, x, x, x, x]"]
    items += [f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    return f"[{', '.join(items)}]"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(capsys, argv: list[str], inputs: list[Path], *expected: str) -> str:
    """Run ``emcid argv``; it must exit 2 with one ``emcid: error:`` line holding every
    ``expected`` text, and leave ``inputs`` byte for byte as they were."""
    before = [digest(p) for p in inputs]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("emcid: error:")]
    for text in expected:
        assert text in line, line
    assert [digest(p) for p in inputs] == before
    return line


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 100_000) -> bytes:
    """A PNG of a few dozen bytes whose header says ``side`` x ``side`` pixels (10**10 by
    default: far over PIL's decompression-bomb limit)."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def png(size: int = 8) -> bytes:
    """A small valid grey PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()
