"""PIL reference outputs for the image reading and resizing of image-to-image
(lumina2_pipeline::source_image, ::resample, ::img2img::luma): small PNGs of
every colour type, what Pillow's `Image.open(p).convert("RGB")` makes of them,
Lanczos resizes as diffusers' VaeImageProcessor.resize does them
(`resize(size, resample=LANCZOS, reducing_gap=None)`), and `convert("L")`.

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
    with open(os.path.join(out, "sizes.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "sizes": SIZES, "decoded": names}, f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
