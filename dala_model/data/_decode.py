"""Full decode of an image file to RGB pixels, and the cache's resize (private support).

One function, :func:`decode_rgb`, returns exactly ``np.asarray(Image.open(data).convert("RGB"))``
for every file, faster where it can. Ingest and the cache builder call it; verification (header,
mode and size checks, ``verify()``) stays on Pillow in ingest, so quarantine reasons are Pillow's.

Which decoder, and why (``bench/decoders.py``, the ``ingest-decoders`` entry of ``make bench``;
first measured on the 106 real BreakHis PNGs of ../shared/breakhis-sample, 2-core AMD EPYC,
2026-12, 9 interleaved rounds, median per-round ratio to Pillow, 1 thread / 2 threads):

- **libspng through imagecodecs** (``imagecodecs.spng_decode``), 1.6x / 1.6x, is the one used.
  It returns Pillow's RGB bit for bit on every 8-bit PNG tried (RGB, RGBA, L, P, with and without
  tRNS, with the real files' gAMA/cHRM/sRGB chunks, which neither applies); it *releases the
  GIL*, so ingest's threads decode in parallel; and it is as strict as Pillow: on 585 truncated
  or bit-flipped files (CRCs fixed up, so only the zlib stream shows the damage) it raised
  wherever Pillow's ``load()`` raised. imagecodecs' libpng decoder (1.75x / 1.6x) ties with it
  within the noise and is as strict; either would do.
- pyspng (libspng too), 1.9x on one thread, holds the GIL for the whole call (1.2x on two
  threads) and switches the zlib checksum off: it returned wrong pixels, without an error, for
  two thirds of the bit-flipped files Pillow rejects. It would let corrupt images into the
  manifest.
- OpenCV (``cv2.imdecode``, 1.2-1.3x) returns a partial image with only a log line for every
  truncated or corrupt file; torchvision.io's ``decode_png``/``decode_image`` (1.15-1.3x) crash
  the interpreter (SIGSEGV) on some corrupt files.

The fast path takes only what was proven identical: PNG, 8 bits per sample, not interlaced,
colour type gray, RGB, palette or RGBA (imagecodecs' libspng has no gray+alpha output), and no
larger than Pillow's ``MAX_IMAGE_PIXELS`` (so its decompression-bomb warning and error still come
from Pillow). Everything else (JPEG, TIFF, 16-bit, sub-byte, interlaced, LA) and every file the
fast decoder refuses is decoded by Pillow, which then raises its own error for a bad file: the
caller's classification (truncated, corrupt, ...) does not depend on which decoder ran first.
Without imagecodecs installed everything goes through Pillow, with the same pixels.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image

try:  # optional at runtime: Pillow decodes everything when it is missing
    from imagecodecs import spng_decode as _spng_decode
except ImportError:  # pragma: no cover - exercised by monkeypatching in tests
    _spng_decode = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST_COLOUR_TYPES = (0, 2, 3, 6)  # gray, RGB, palette, RGBA (not 4: gray+alpha)


def fast_decoder() -> str | None:
    """The fast decoder in use (for run records and the bench), or None when Pillow does it all."""
    return "imagecodecs.spng_decode (libspng)" if _spng_decode is not None else None


def takes_fast_path(data: bytes) -> bool:
    """Whether :func:`decode_rgb` tries the fast decoder on ``data`` (read from the PNG header)."""
    if _spng_decode is None or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return False
    if len(data) < 29:
        return False
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    limit = Image.MAX_IMAGE_PIXELS
    return (
        depth == 8
        and colour in FAST_COLOUR_TYPES
        and interlace == 0
        and (limit is None or width * height <= limit)
    )


def decode_rgb(data: bytes, formats: Sequence[str] | None = None) -> np.ndarray:
    """Every pixel of ``data`` as ``uint8 (H, W, 3)``, equal to Pillow's ``convert("RGB")``.

    Raises what Pillow raises for a file it cannot decode (``formats`` limits Pillow's decoders
    as in ``Image.open``; the fast path is PNG only).
    """
    if takes_fast_path(data):
        try:
            return _spng_to_rgb(_spng_decode(data))
        except Exception:  # any refusal: Pillow decides, and names the fault
            pass
    return pil_decode_rgb(data, formats)


def pil_decode_rgb(data: bytes, formats: Sequence[str] | None = None) -> np.ndarray:
    """The reference: Pillow's full decode and RGB conversion, as ``uint8 (H, W, 3)``."""
    with Image.open(io.BytesIO(data), formats=formats) as image:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)


def resize_rgb(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` (uint8 HxWx3) resized to ``size x size`` with Pillow's bilinear filter."""
    image = Image.fromarray(pixels, "RGB")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _spng_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """libspng's native output (G8, RGB8 or RGBA8) as RGB: gray replicated, alpha dropped."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"unexpected {pixels.dtype} output")
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return np.ascontiguousarray(pixels[..., :3])
    raise ValueError(f"unexpected output shape {pixels.shape}")
