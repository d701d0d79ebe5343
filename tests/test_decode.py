"""The fast decoder gives Pillow's RGB pixels bit for bit, is as strict as Pillow about damaged
files, releases the GIL, and falls back to Pillow for everything it was not proven on."""

from __future__ import annotations

import io
import random
import struct
import sys
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from dala_model.data import _decode
from dala_model.data.cache import resize
from dala_model.data.synth import generate


def _reference(data: bytes) -> np.ndarray:
    """What ingest decoded before the fast path: Pillow's full decode, converted to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def _save(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunks(data: bytes):
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        yield pos, length, data[pos + 4 : pos + 8]
        pos += 12 + length


def _fix_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC, so only the zlib stream can show the damage."""
    out = bytearray(data)
    for pos, length, _ in _chunks(data):
        body = bytes(out[pos + 4 : pos + 8 + length])
        out[pos + 8 + length : pos + 12 + length] = struct.pack(">I", zlib.crc32(body))
    return bytes(out)


@pytest.fixture(scope="module")
def synthetic_pngs(module_tmp) -> list[bytes]:
    out = module_tmp("synth")
    generate(str(out), patients=2, images_per_patient=1, seed=5, size=(350, 230))
    return [path.read_bytes() for path in sorted(out.rglob("*.png"))]


@pytest.fixture(scope="module")
def modes(synthetic_pngs) -> dict[str, tuple[bytes, bool]]:
    """Every PNG flavour ingest accepts or refuses: name -> (bytes, takes the fast path)."""
    rgb = Image.open(io.BytesIO(synthetic_pngs[0])).convert("RGB")
    array = np.asarray(rgb)
    alpha = (np.arange(array.shape[1]) % 256).astype(np.uint8)[None, :].repeat(array.shape[0], 0)
    rgba = Image.fromarray(np.dstack([array, alpha]), "RGBA")
    imagecodecs = pytest.importorskip("imagecodecs")
    wide = array.astype(np.uint16) * 257 + np.uint16(0x7F)  # low bytes that rounding would show
    return {
        "RGB": (_save(rgb), True),
        "RGBA": (_save(rgba), True),
        "L": (_save(rgb.convert("L")), True),
        "L+tRNS": (_save(rgb.convert("L"), transparency=7), True),
        "P": (_save(rgb.quantize(256)), True),
        "P+tRNS": (_save(rgb.quantize(256), transparency=3), True),
        "RGB+tRNS": (_save(rgb, transparency=(10, 20, 30)), True),
        "LA": (_save(rgba.convert("LA")), False),  # no gray+alpha output in imagecodecs' libspng
        "P 4-bit": (_save(rgb.quantize(16), bits=4), False),
        "1-bit": (_save(rgb.convert("1")), False),
        "I;16": (_save(Image.fromarray(array[..., 0].astype(np.uint16) * 257)), False),
        "RGB 16-bit": (imagecodecs.png_encode(wide), False),
        "RGBA 16-bit": (imagecodecs.png_encode(np.dstack([wide, wide[..., :1]])), False),
        "JPEG": (_save(rgb, "JPEG"), False),
        "TIFF": (_save(rgb, "TIFF"), False),
    }


def test_the_fast_decoder_is_installed():
    assert _decode.fast_decoder() is not None  # imagecodecs is a dependency (pyproject.toml)


def test_real_breakhis_pngs_decode_identically_on_the_fast_path(breakhis_sample):
    files = sorted(breakhis_sample.rglob("*.png"))
    assert len(files) == 106
    for path in files:
        data = path.read_bytes()
        assert _decode.takes_fast_path(data), path.name
        np.testing.assert_array_equal(_decode.decode_rgb(data), _reference(data), err_msg=path.name)


def test_synthetic_pngs_decode_identically_on_the_fast_path(synthetic_pngs):
    for data in synthetic_pngs:
        assert _decode.takes_fast_path(data)
        got = _decode.decode_rgb(data)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, _reference(data))


@pytest.mark.parametrize(
    "name",
    ["RGB", "RGBA", "L", "L+tRNS", "P", "P+tRNS", "RGB+tRNS", "LA", "P 4-bit", "1-bit", "I;16"]
    + ["RGB 16-bit", "RGBA 16-bit", "JPEG", "TIFF"],
)
def test_every_mode_gives_pillows_rgb_and_only_proven_ones_take_the_fast_path(modes, name):
    data, fast = modes[name]
    assert _decode.takes_fast_path(data) is fast
    got = _decode.decode_rgb(data)
    assert got.dtype == np.uint8 and got.shape[2] == 3
    np.testing.assert_array_equal(got, _reference(data))


def test_without_imagecodecs_pillow_decodes_everything(modes, monkeypatch):
    monkeypatch.setattr(_decode, "_spng_decode", None)
    assert _decode.fast_decoder() is None
    for name, (data, _) in modes.items():
        assert not _decode.takes_fast_path(data), name
        np.testing.assert_array_equal(_decode.decode_rgb(data), _reference(data), err_msg=name)


def _damaged(good: bytes, count: int, seed: int) -> list[bytes]:
    """Truncations, and single bit flips inside IDAT with every CRC fixed up."""
    rng = random.Random(seed)
    idat = [(pos, length) for pos, length, kind in _chunks(good) if kind == b"IDAT"]
    files = [good[: rng.randrange(64, len(good))] for _ in range(count)]
    for _ in range(count):
        pos, length = rng.choice(idat)
        flipped = bytearray(good)
        flipped[pos + 8 + rng.randrange(length)] ^= 1 << rng.randrange(8)
        files.append(_fix_crcs(bytes(flipped)))
    last_pos, last_length = idat[-1]
    files.append(good[:last_pos] + good[last_pos + 12 + last_length :])  # an IDAT chunk missing
    return files


def test_damaged_pngs_raise_pillows_own_error(synthetic_pngs, modes):
    """The fast decoder refuses every file Pillow refuses (libspng checks the zlib Adler-32, which
    pyspng switches off), so Pillow then names the fault exactly as before."""
    imagecodecs = pytest.importorskip("imagecodecs")
    refused = 0
    sources = [synthetic_pngs[0], modes["RGBA"][0], modes["P"][0], modes["L"][0]]
    for k, good in enumerate(sources):
        for data in _damaged(good, count=12, seed=k):
            try:
                expected = _reference(data)
            except Exception as exc:  # what Pillow says is the reference, whatever it is
                with pytest.raises(imagecodecs.SpngError):
                    _decode._spng_decode(data)  # libspng never accepts a file Pillow refuses
                with pytest.raises(type(exc)) as raised:
                    _decode.decode_rgb(data)
                assert str(raised.value) == str(exc)
                refused += 1
            else:
                np.testing.assert_array_equal(_decode.decode_rgb(data), expected)
    assert refused >= 4 * 12  # the bit flips alone; most truncations are refused too


def test_large_images_leave_the_decompression_bomb_guard_to_pillow(modes, monkeypatch):
    data, _ = modes["RGB"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert not _decode.takes_fast_path(data)
    with pytest.raises(Image.DecompressionBombError):
        _decode.decode_rgb(data)


def test_interlaced_pngs_take_pillows_path(modes):
    data, _ = modes["RGB"]
    header = bytearray(data)
    header[28] = 1  # IHDR interlace method: Adam7
    assert not _decode.takes_fast_path(bytes(header))


def test_resize_rgb_equals_the_cache_resize_of_pillows_image(modes):
    for name in ("RGB", "RGBA", "P", "L"):
        data, _ = modes[name]
        expected = resize(Image.open(io.BytesIO(data)), 64)
        np.testing.assert_array_equal(_decode.resize_rgb(_decode.decode_rgb(data), 64), expected)


def test_the_fast_decoder_releases_the_gil(synthetic_pngs):
    """A pure-Python thread makes progress during one decode call: with a long switch interval a
    decoder that holds the GIL leaves it at exactly zero (pyspng does)."""
    data = _save(Image.open(io.BytesIO(synthetic_pngs[0])).resize((2000, 1400)))
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.25)  # several times one decode call
    progress = []
    try:
        while len(progress) < 5 and not any(progress):  # a busy CPU may starve one attempt
            progress.append(_count_during(lambda: _decode._spng_decode(data)))
    finally:
        sys.setswitchinterval(previous)
    assert any(progress), progress


def _count_during(call) -> int:
    count, stop, started = [0], threading.Event(), threading.Event()

    def counter() -> None:
        started.set()
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=counter)
    thread.start()
    started.wait()
    count[0] = 0
    call()
    seen = count[0]
    stop.set()
    thread.join()
    return seen
