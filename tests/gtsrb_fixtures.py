"""Test helpers for the predictor and the GUI: a small random checkpoint and drawn traffic signs.

Nothing here needs the GTSRB data or a GPU. ``make_checkpoint`` saves a randomly initialised,
small network with ``save_checkpoint``; ``make_sign`` draws a simple sign with PIL;
``make_bad_files`` writes the files a reader must reject (or, for CMYK, accept).
"""
import math
import os
import random
import struct
import zlib

import torch
from PIL import Image, ImageDraw

from odconv.checkpoint import save_checkpoint
from odconv.data import GTSRB_CLASSES, PREPROCESS_DEFAULTS
from odconv.models import build_model

SMALL_MODEL = {"stem_width": 8, "widths": [8, 16], "blocks": [1, 1]}
SIGN_KINDS = ("red_circle", "blue_disc", "triangle", "stop")


def make_checkpoint(path, seed=0, model_config=SMALL_MODEL):
    """Saves a randomly initialised small GTSRB network at ``path`` and returns the path."""
    torch.manual_seed(seed)
    model = build_model(model_config)
    save_checkpoint({
        "model": dict(model.config),
        "state_dict": model.state_dict(),
        "class_names": list(GTSRB_CLASSES),
        "preprocess": dict(PREPROCESS_DEFAULTS),
        "temperature": 1.0,
        "epoch": 0,
        "best_val_accuracy": 0.0,
        "metrics": {},
    }, str(path))
    return str(path)


def make_sign(kind="red_circle", size=64, background=(110, 150, 90), seed=0):
    """A simple drawn traffic sign as an RGB PIL image."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    m = size // 8
    box = (m, m, size - m, size - m)
    if kind == "red_circle":  # speed-limit style: white disc, red ring, a dark bar
        draw.ellipse(box, fill=(200, 20, 30))
        draw.ellipse((2 * m, 2 * m, size - 2 * m, size - 2 * m), fill=(245, 245, 245))
        draw.rectangle((3 * m, size // 2 - m // 2, size - 3 * m, size // 2 + m // 2), fill=(20, 20, 20))
    elif kind == "blue_disc":  # mandatory direction: blue disc, white arrow
        draw.ellipse(box, fill=(20, 70, 180))
        draw.polygon([(size // 2, 2 * m), (size - 3 * m, size // 2), (3 * m, size // 2)], fill=(250, 250, 250))
        draw.rectangle((size // 2 - m // 2, size // 2, size // 2 + m // 2, size - 2 * m), fill=(250, 250, 250))
    elif kind == "triangle":  # warning: red triangle, white inside, black mark
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=(210, 25, 25))
        draw.polygon([(size // 2, 3 * m), (size - 2.6 * m, size - 1.6 * m), (2.6 * m, size - 1.6 * m)], fill=(250, 250, 250))
        draw.rectangle((size // 2 - m // 3, 4 * m, size // 2 + m // 3, size - 2.5 * m), fill=(10, 10, 10))
    elif kind == "stop":  # red octagon
        c, r = size / 2, size / 2 - m
        points = [(c + r * math.cos(math.pi / 8 + i * math.pi / 4), c + r * math.sin(math.pi / 8 + i * math.pi / 4))
                  for i in range(8)]
        draw.polygon(points, fill=(200, 20, 20))
        draw.rectangle((2.5 * m, size // 2 - m // 2, size - 2.5 * m, size // 2 + m // 2), fill=(250, 250, 250))
    else:
        raise ValueError(f"unknown sign kind {kind!r}")
    if seed:  # a little deterministic noise so images differ
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.randn(size, size, 3, generator=gen) * 6).round().to(torch.int16)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).to(torch.int16)
        image = Image.fromarray((pixels + noise).clamp(0, 255).to(torch.uint8).numpy(), "RGB")
    return image


def write_signs(folder, count, size=48, ext=".png"):
    """Writes ``count`` drawn signs into ``folder``; returns their paths in sorted order."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(str(folder), f"sign_{i:03d}{ext}")
        make_sign(SIGN_KINDS[i % len(SIGN_KINDS)], size=size, seed=i + 1).save(path)
        paths.append(path)
    return sorted(paths)


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_png(path, width=40000, height=40000):
    """A tiny PNG file whose header claims width x height pixels: a decompression bomb for PIL."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) \
        + _png_chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def make_bad_files(folder):
    """Files that must be rejected with a clear error, plus a CMYK JPEG that must load.

    Returns ``{"corrupt", "sixteen_bit", "text", "huge", "cmyk"}`` -> path.
    """
    os.makedirs(folder, exist_ok=True)
    folder = str(folder)
    paths = {}
    paths["corrupt"] = os.path.join(folder, "corrupt.png")
    with open(paths["corrupt"], "wb") as f:
        f.write(random.Random(0).randbytes(4096))  # random bytes under a .png name
    paths["sixteen_bit"] = os.path.join(folder, "sixteen_bit.png")
    sixteen = Image.new("I;16", (40, 40))
    sixteen.putdata([(x * 1500) % 65535 for x in range(40 * 40)])
    sixteen.save(paths["sixteen_bit"])
    paths["text"] = os.path.join(folder, "notes.txt")
    with open(paths["text"], "w") as f:
        f.write("this is not an image\n")
    paths["huge"] = write_huge_png(os.path.join(folder, "huge.png"))
    paths["cmyk"] = os.path.join(folder, "cmyk_sign.jpg")
    make_sign("blue_disc", size=56).convert("CMYK").save(paths["cmyk"], "JPEG", quality=92)
    return paths
