"""Writes the small data fixtures the invalid recipes under tests/recipes read
(standard library only): tiny PNG class folders, a safetensors file and JSON lines.
Run from this folder: python3 make.py"""

import json
import os
import struct
import zlib


def png(path, width, height, gray):
    """A grayscale PNG of `gray` values, one row per list item."""
    raw = b"".join(b"\x00" + bytes(row) for row in gray)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def images():
    for cls, value in [("circle", 40), ("square", 200)]:
        os.makedirs(f"shapes/{cls}", exist_ok=True)
        for i in range(2):
            png(f"shapes/{cls}/{i}.png", 8, 8, [[value + i] * 8] * 8)
    os.makedirs("empty_class/full", exist_ok=True)
    os.makedirs("empty_class/empty", exist_ok=True)
    png("empty_class/full/0.png", 8, 8, [[9] * 8] * 8)
    open("empty_class/empty/notes.txt", "w").write("no image here\n")


def safetensors():
    n = 4
    tensors = {
        "x": ("F32", [n, 64], struct.pack(f"<{n * 64}f", *[i / 256 for i in range(n * 64)])),
        "y": ("I64", [n], struct.pack(f"<{n}q", 0, 1, 0, 1)),
        "y_short": ("I64", [n - 1], struct.pack(f"<{n - 1}q", 0, 1, 0)),
    }
    header, data = {}, b""
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open("arrays.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def jsonl():
    with open("records.jsonl", "w") as f:
        f.write('{"text": "Call me Ishmael."}\n')
        f.write('{"text": "Some years ago, never mind how long precisely."}\n')
        f.write('{"body": "having little or no money in my purse"}\n')


images()
safetensors()
jsonl()
