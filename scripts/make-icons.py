#!/usr/bin/env python3
"""Draws the web page's PNG icons (node/src/http/web/icon-192.png, icon-512.png): the same
picture as icon.svg (three linked dots on the accent colour, full bleed so it also works as a
maskable icon). Plain Python (zlib), no image library; run once, the PNGs are committed."""
import math
import struct
import sys
import zlib
from pathlib import Path

BG = (0x2F, 0x6F, 0xED)
FG = (0xFF, 0xFF, 0xFF)
# In a 100x100 box, as in icon.svg.
DOTS = [(50, 30), (30, 64), (70, 64)]
DOT_R = 9
LINE_W = 5


def seg_dist(px, py, ax, ay, bx, by):
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


def coverage(x, y):
    """1 when the point (in the 100 box) is white."""
    for cx, cy in DOTS:
        if math.hypot(x - cx, y - cy) <= DOT_R:
            return 1.0
    for i in range(3):
        (ax, ay), (bx, by) = DOTS[i], DOTS[(i + 1) % 3]
        if seg_dist(x, y, ax, ay, bx, by) <= LINE_W / 2:
            return 1.0
    return 0.0


def png(size):
    ss = 3  # supersampling per axis
    rows = []
    for j in range(size):
        row = bytearray([0])
        for i in range(size):
            c = 0.0
            for sj in range(ss):
                for si in range(ss):
                    c += coverage((i + (si + 0.5) / ss) * 100 / size, (j + (sj + 0.5) / ss) * 100 / size)
            c /= ss * ss
            row += bytes(round(BG[k] * (1 - c) + FG[k] * c) for k in range(3))
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows), 9)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def main():
    web = Path(__file__).resolve().parent.parent / "node/src/http/web"
    for size in (192, 512):
        (web / f"icon-{size}.png").write_bytes(png(size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
