"""What the import does to pixels: every image is stored in a format all readers agree on, and a JPEG must be whole.

Every later reader of an imported image agrees on 8-bit greyscale and 8-bit RGB files, and on little else:
Pillow's `convert("RGB")` (LoRA, generation, evaluation, report) clips a 16-bit grey PNG at 255 (a typical
ultrasound frame turns 99.5% white), while OpenCV's `imread` inside ultralytics (the detector) divides it by
256; palettes, alpha and bilevel images differ again between readers. So the import decides once, per mode
Pillow reports, and stores what it decided:

  L, RGB                    stored as is (8-bit grey, 8-bit colour; a 16-bit RGB PNG reads as its high bytes
                            in Pillow and OpenCV alike, so it is stored as is too)
  I;16, I;16B/L/N, and I    16-bit grey: scaled to 8-bit grey by its actual bit depth,
  from a PNG                round(v * 255 / (2**bits - 1)), where bits is the PNG's sBIT chunk (significant
                            bits, e.g. 12 for a 12-bit scanner) when present, else 16; stored as a PNG
  1                         8-bit grey, 0 and 255 (PNG)
  LA                        8-bit grey, alpha dropped, as both readers drop it (PNG)
  P, PA, RGBA, RGBX, RGBa   8-bit RGB: palette applied, alpha dropped (PNG)
  CMYK, F, I (not a PNG),   rejected with the reason: no conversion every reader would make the same way
  anything else             (CMYK JPEGs are stored inverted by some writers; float and 32-bit integer pixels
                            have no fixed range)

A converted image is stored as the 8-bit PNG (its sha256 and image id are those of the stored bytes); the run's
`data/sources.parquet` records the conversion next to the original path.

JPEG: libjpeg fills a scan that ends early with flat grey and only prints "Corrupt JPEG data: premature end of
data segment" on stderr; Pillow does not even print it, and neither Pillow nor OpenCV lets a caller turn that
warning into an error. A JPEG cut short and given an end-of-image marker (what Pillow's own
LOAD_TRUNCATED_IMAGES writes) therefore decodes "fine". `jpeg_truncation` finds it from the outside instead:
  1. bytes inserted before the end-of-image marker either change the decoded pixels (the decoder was still
     reading the scan: they became image data, so the scan ended early) or are skipped as padding after a
     complete scan (identical pixels);
  2. with restart markers, a scan cut right at a segment boundary ignores such bytes, so a sequential scan also
     needs its full count of restart markers: ceil(MCUs / restart interval) - 1.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

STORED_AS_IS = frozenset({"L", "RGB"})
_GREY_16 = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_TO_RGB = frozenset({"P", "PA", "RGBA", "RGBX", "RGBa"})
_PAD = b"\x00" * 1024  # inserted before a JPEG's end marker (step 1 above); zero bits decode as image data


# --- pixel formats -----------------------------------------------------------------------------

def png_significant_bits(data: bytes) -> int | None:
    """The sBIT chunk of a greyscale PNG (how many of its 16 bits carry data), None when absent.

    Pillow does not expose sBIT, so the chunks before the first IDAT are walked here."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"sBIT" and length >= 1:
            bits = data[pos + 8]
            return bits if 1 <= bits <= 16 else None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def conversion_for(image: Image.Image, data: bytes) -> str | None:
    """How the import stores an image of this mode: None = as is; else what it does. Raises ValueError with
    the rejection reason when no conversion is safe (see the table in the module docstring)."""
    mode = image.mode
    if mode in STORED_AS_IS:
        return None
    if mode in _GREY_16 or (mode == "I" and image.format == "PNG"):
        bits = png_significant_bits(data) if image.format == "PNG" else None
        depth = f"{bits} significant bits" if bits else "16 bits"
        return f"16-bit grey ({depth}) scaled to 8-bit grey"
    if mode == "1":
        return "1-bit black/white stored as 8-bit grey (0/255)"
    if mode == "LA":
        return "grey + alpha stored as 8-bit grey (alpha dropped)"
    if mode in _TO_RGB:
        what = {"P": "palette", "PA": "palette + alpha"}.get(mode, mode)
        return f"{what} stored as 8-bit RGB" + (" (alpha dropped)" if "A" in mode or mode == "RGBa" else "")
    if mode == "CMYK":
        raise ValueError("CMYK image: readers convert CMYK to RGB differently (some writers store it inverted); "
                         "save it as greyscale or RGB")
    if mode == "F":
        raise ValueError("32-bit float pixels have no fixed range to map to 8 bits; save it as 8- or 16-bit greyscale")
    if mode == "I":
        raise ValueError(f"32-bit integer pixels ({image.format}) have no fixed range to map to 8 bits; save it as "
                         "8- or 16-bit greyscale")
    raise ValueError(f"pixel format {mode} is not supported; save it as 8-bit greyscale or RGB")


def to_8bit(image: Image.Image, data: bytes) -> Image.Image:
    """The loaded `image` in the stored 8-bit mode (L or RGB); `data` is its file (for the PNG's sBIT)."""
    mode = image.mode
    if mode in STORED_AS_IS:
        return image
    if mode in _GREY_16 or mode == "I":
        bits = (png_significant_bits(data) if image.format == "PNG" else None) or 16
        values = np.asarray(image).astype(np.float64)
        scaled = np.clip(np.rint(values * (255.0 / (2 ** bits - 1))), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    if mode in ("1", "LA"):
        return image.convert("L")
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    """The stored PNG of an 8-bit image: same pixels, same bytes on every run (no metadata, fixed settings)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --- JPEG completeness -------------------------------------------------------------------------

def _jpeg_structure(data: bytes) -> tuple[int | None, int | None, int]:
    """(offset of the end-of-image marker or None, the restart markers a single sequential interleaved scan
    must hold or None when that is not the case, the restart markers found in the scans)."""
    n = len(data)
    pos, interval, mcus, sequential, restarts, scans = 2, 0, 0, False, 0, 0
    components: list[tuple[int, int]] = []
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return None, None, restarts
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            expected = None
            if sequential and interval and scans == 1 and mcus:
                expected = math.ceil(mcus / interval) - 1
            return pos, expected, restarts
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > n:
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        body = data[pos + 4:pos + 2 + length]
        if marker in (0xC0, 0xC1, 0xC2) and len(body) >= 6:  # SOF: baseline, extended, progressive
            sequential = marker != 0xC2
            height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            components = [(body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count) if 8 + 3 * i < len(body)]
            if components:
                h_max, v_max = max(h for h, _ in components), max(v for _, v in components)
                mcus = math.ceil(width / (8 * h_max)) * math.ceil(height / (8 * v_max))
        elif marker == 0xDD and len(body) >= 2:  # DRI: restart interval, in MCUs
            interval = int.from_bytes(body[0:2], "big")
        pos += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker that is not FF00, a fill or a restart
            scans += 1
            if body and components and body[0] != len(components):
                sequential = False  # a non-interleaved scan counts MCUs per component: not checked here
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return None, None, restarts
                following = data[pos + 1]
                if following == 0x00:
                    pos += 2
                elif 0xD0 <= following <= 0xD7:
                    restarts += 1
                    pos += 2
                elif following == 0xFF:
                    pos += 1
                else:
                    break
    return None, None, restarts


def _decoded(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.tobytes()


def jpeg_truncation(data: bytes, decoded: bytes) -> str | None:
    """Why the JPEG `data` (whose full decode is `decoded`) is cut short, or None when its scan data is whole."""
    eoi, expected_restarts, restarts = _jpeg_structure(data)
    if eoi is None:
        return None  # no end marker at all: Pillow's own truncation error reports it
    cut = "JPEG data ends before the image does (libjpeg: 'Corrupt JPEG data: premature end of data segment')"
    if expected_restarts is not None and restarts < expected_restarts:
        return f"{cut}: {restarts} of {expected_restarts} restart markers"
    try:
        padded = _decoded(data[:eoi] + _PAD + data[eoi:])
    except (OSError, SyntaxError, ValueError):
        return cut
    return cut if padded != decoded else None
