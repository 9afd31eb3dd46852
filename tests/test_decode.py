"""Decoding: orientation, odd modes, bad files, and the worker pool."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from florence_cli.decode import DecodedImage, DecodeFailure, ResizeSpec, decode_image, decode_stream, open_rgb
from florence_cli.discover import ImageRef

from .conftest import random_image

SPEC = ResizeSpec(size=(32, 32))


def _ref(path) -> ImageRef:
    return ImageRef(str(path), path.name, (0, path.name))


def test_exif_orientation_is_applied(tmp_path):
    image = random_image(1, size=(60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    width, height, pixels = decode_image(str(path), ResizeSpec(size=None))
    assert (width, height) == (40, 60)  # displayed size, after orientation
    assert pixels.shape == (60, 40, 3)
    with Image.open(path) as raw:
        assert raw.size == (60, 40)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_odd_modes_decode_to_rgb_like_the_reference(tmp_path, mode):
    image = random_image(2, size=(40, 30))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    path = tmp_path / ("x.tif" if mode in {"CMYK", "I;16", "I", "F"} else "x.png")
    image.save(path)
    width, height, pixels = decode_image(str(path), SPEC)
    assert (width, height) == (40, 30) and pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    with Image.open(path) as reopened:
        expected = np.asarray(reopened.convert("RGB").resize((32, 32), resample=3))
    assert np.array_equal(pixels, expected)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    _, _, pixels = decode_image(str(path), ResizeSpec(size=None))
    assert tuple(pixels[10, 10]) == (255, 0, 0)


def _bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    random_image(3, size=(200, 150)).save(good, quality=90)
    data = good.read_bytes()
    files = {
        "zero.jpg": b"",
        "text.png": b"this is not an image",
        "truncated.jpg": data[: len(data) // 2],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [good] + [tmp_path / n for n in files]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_become_failures_in_order(tmp_path, workers):
    paths = [*_bad_files(tmp_path), tmp_path / "missing.jpg"]
    results = list(decode_stream((_ref(p) for p in paths), SPEC, workers=workers))
    assert [r.ref.name for r in results] == [p.name for p in paths]
    assert isinstance(results[0], DecodedImage)
    reasons = {r.ref.name: r.reason for r in results[1:]}
    assert all(isinstance(r, DecodeFailure) for r in results[1:])
    assert reasons["zero.jpg"] == "empty file (0 bytes)"
    assert reasons["text.png"] == "not a readable image"
    assert "truncated" in reasons["truncated.jpg"]
    assert "No such file" in reasons["missing.jpg"]
    assert all("\n" not in reason for reason in reasons.values())


def test_worker_pool_keeps_order_over_many_images(tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        random_image(i, size=(20 + i, 20)).save(path)
        paths.append(path)
    results = list(decode_stream((_ref(p) for p in paths), SPEC, workers=2))
    assert [r.ref.name for r in results] == [p.name for p in paths]
    assert [r.width for r in results] == [20 + i for i in range(12)]


def test_open_rgb_matches_reference_convert(tmp_path):
    path = tmp_path / "p.png"
    random_image(4).convert("P").save(path)
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(open_rgb(str(path))), np.asarray(image.convert("RGB")))


def test_a_file_that_kills_the_decoder_fails_alone(tmp_path):
    from .crashing_decoder import crash_on_poison

    paths = []
    for i in range(6):
        path = tmp_path / (f"poison{i}.png" if i == 2 else f"{i}.png")
        random_image(i, size=(24, 24)).save(path)
        paths.append(path)
    results = list(decode_stream((_ref(p) for p in paths), SPEC, workers=2, decoder=crash_on_poison))
    assert [r.ref.name for r in results] == [p.name for p in paths]
    failures = [r for r in results if isinstance(r, DecodeFailure)]
    assert [(f.ref.name, f.reason) for f in failures] == [
        ("poison2.png", "decoder process crashed on this file")
    ]
