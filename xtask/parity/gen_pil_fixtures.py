"""PIL reference outputs for the image reading and resizing of image-to-image
(lumina2_pipeline::source_image, ::resample, ::img2img::luma): small PNGs of
every colour type, what Pillow's `Image.open(p).convert("RGB")` makes of them,
Lanczos resizes as diffusers' VaeImageProcessor.resize does them
(`resize(size, resample=LANCZOS, reducing_gap=None)`), and `convert("L")`.

The two-axis resizes cover both orders of Pillow's two passes
(src/libImaging/Resample.c, ImagingResampleInner: the vertical pass runs first
when `in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2`): upscales,
downscales, mixed, odd and 1-pixel sizes, sizes on either side of that
boundary, in RGB and L. For each, `order` records which two-call composition
of one-axis resizes Pillow's own result equals ("h": width first, "v": height
first, "hv": both give the same pixels), so the test checks the rule itself.

    target/parity-venv/bin/python xtask/parity/gen_pil_fixtures.py crates/lumina2-pipeline/tests/fixtures/pil"""

import json
import os
import struct
import sys
import zlib

import numpy as np
import PIL
from PIL import Image

SIZES = [(32, 16), (48, 32), (11, 29), (23, 40), (7, 17)]


def two_axis_sizes(w, h, count, rng, up):
    """Output sizes that change both axes of a w x h source: the boundary of
    Pillow's pass order (dh == 2 dw, one more, one less), sizes 1 and 2, then
    random ones from a 32nd of the source up to `up` times it, deduplicated."""
    out = []

    def add(ow, oh):
        if (1 <= ow <= up * w and 1 <= oh <= up * h and ow != w and oh != h
                and (ow, oh) not in out):
            out.append((ow, oh))
    for dw in (1, 2, 3, 5, -1, -4, -9):
        for extra in (-1, 0, 1):
            add(w - dw, h - (2 * dw + extra))
    for ow, oh in [(1, 1), (1, 2), (2, 1), (1, h + 5), (w + 5, 1), (2 * w, 2 * h), (w // 2, h // 2),
                   (w - 1, h - 1), (w + 1, h + 1), (w + 1, h - 1), (w - 1, h + 1)]:
        add(ow, oh)
    while len(out) < count:
        add(int(rng.integers(max(1, w // 32), int(up * w) + 1)), int(rng.integers(max(1, h // 32), int(up * h) + 1)))
    return out


def order(im, ow, oh, direct):
    """Which composition of two one-axis resizes Pillow's direct result equals."""
    w, h = im.size
    lz = Image.Resampling.LANCZOS
    hf = im.resize((ow, h), lz).resize((ow, oh), lz).tobytes() == direct.tobytes()
    vf = im.resize((w, oh), lz).resize((ow, oh), lz).tobytes() == direct.tobytes()
    assert hf or vf, f"{im.mode} {im.size} -> {ow}x{oh}: neither pass order"
    return ("h" if hf else "") + ("v" if vf else "")


def png16(path, arr, color_type):
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def main(out):
    os.makedirs(out, exist_ok=True)
    g = np.random.default_rng(0)
    h, w = 17, 23
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([128 + 120 * np.sin(x / 2), 128 + 120 * np.cos(y / 3), 255 * x / (w - 1)], -1)
    rgb = np.clip(rgb + g.normal(0, 30, rgb.shape), 0, 255).astype(np.uint8)
    alpha = g.integers(0, 256, (h, w), dtype=np.uint8)
    inputs = {
        "rgb": Image.fromarray(rgb, "RGB"),
        "rgba": Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA"),
        "l": Image.fromarray(rgb[..., 0], "L"),
        "la": Image.fromarray(np.stack([rgb[..., 1], alpha], -1), "LA"),
        "p": Image.fromarray(rgb, "RGB").quantize(16),
        "gray1": Image.fromarray(rgb[..., 0] > 128).convert("1"),
    }
    p_trns = Image.fromarray(rgb, "RGB").quantize(8)
    p_trns.info["transparency"] = 3
    for name, im in inputs.items():
        im.save(os.path.join(out, f"{name}.png"))
    p_trns.save(os.path.join(out, "p_trns.png"), transparency=3)
    wide = (rgb.astype(np.uint16) * 257 + g.integers(0, 257, rgb.shape).astype(np.uint16))
    png16(os.path.join(out, "rgb16.png"), wide, 2)
    png16(os.path.join(out, "gray16.png"), (g.integers(0, 600, (h, w))).astype(np.uint16), 0)
    names = list(inputs) + ["p_trns", "rgb16", "gray16"]
    for name in names:
        im = Image.open(os.path.join(out, f"{name}.png")).convert("RGB")
        im.save(os.path.join(out, f"{name}.rgb.png"))
    # Resizes of the RGB picture (diffusers resizes after load_image's convert("RGB")),
    # and the grey mask the mask processor makes of each.
    base = Image.open(os.path.join(out, "rgb.png")).convert("RGB")
    for (ow, oh) in SIZES:
        r = base.resize((ow, oh), resample=Image.Resampling.LANCZOS, reducing_gap=None)
        r.save(os.path.join(out, f"rgb.lanczos_{ow}x{oh}.png"))
        r.convert("L").save(os.path.join(out, f"rgb.lanczos_{ow}x{oh}.l.png"))
    # Two-axis resizes: the RGB picture, its red channel as L, and a larger
    # RGB picture (stronger downscales, small upscales only: the fixtures stay small).
    by, bx = np.mgrid[0:47, 0:61].astype(np.float64)
    big = np.stack([128 + 120 * np.sin(bx / 3 + by / 5), 128 + 120 * np.cos(by / 4), 255 * by / 46], -1)
    big = np.clip(big + g.normal(0, 30, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big, "RGB").save(os.path.join(out, "big.png"))
    sources = {"rgb": (base, 70, 2), "l": (Image.open(os.path.join(out, "l.png")), 40, 2),
               "big": (Image.open(os.path.join(out, "big.png")).convert("RGB"), 30, 1.2)}
    two_axis = []
    for name, (im, count, up) in sources.items():
        for (ow, oh) in two_axis_sizes(*im.size, count, g, up):
            r = im.resize((ow, oh), resample=Image.Resampling.LANCZOS, reducing_gap=None)
            r.save(os.path.join(out, f"{name}.lanczos_{ow}x{oh}.png"))
            two_axis.append([name, ow, oh, order(im, ow, oh, r)])
    with open(os.path.join(out, "sizes.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "sizes": SIZES, "decoded": names, "two_axis": two_axis}, f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
