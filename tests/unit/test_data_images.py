"""Image decoding to RGB (every mode and input form) and PAPO's min/max-pixel resize."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from megatron_papo.data.images import ImageDecodeError, decode_image, resize_by_pixels, resized_size, to_rgb


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_palette_image_decodes_to_its_colours():
    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = decode_image(pal)
    assert out.mode == "RGB" and out.getpixel((1, 0)) == (200, 10, 20) and out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_and_pa():
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert decode_image(pal).getpixel((0, 0)) == (10, 20, 30)  # alpha dropped: stored colour kept
    assert decode_image(pal, alpha="white").getpixel((0, 0)) == (255, 255, 255)
    pa = Image.new("PA", (1, 1))
    pa.putpalette([7, 8, 9] + [0] * 765)
    assert decode_image(pa).getpixel((0, 0)) == (7, 8, 9)


def test_rgba_drop_vs_white():
    img = Image.new("RGBA", (2, 1), (100, 50, 25, 0))
    img.putpixel((1, 0), (100, 50, 25, 128))
    assert decode_image(img).getpixel((0, 0)) == (100, 50, 25)
    white = decode_image(img, alpha="white")
    assert white.getpixel((0, 0)) == (255, 255, 255)
    # 50% alpha over white: 100*a + 255*(1-a) with a = 128/255
    a = 128 / 255
    expect = tuple(round(c * a + 255 * (1 - a)) for c in (100, 50, 25))
    assert all(abs(x - y) <= 1 for x, y in zip(white.getpixel((1, 0)), expect))


def test_l_la_one_cmyk_modes():
    assert decode_image(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert decode_image(Image.new("LA", (1, 1), (90, 0))).getpixel((0, 0)) == (90, 90, 90)
    assert decode_image(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in naive CMYK
    assert decode_image(cmyk).getpixel((0, 0)) == (255, 0, 0)
    assert decode_image(Image.new("CMYK", (1, 1), (0, 0, 0, 255))).getpixel((0, 0)) == (0, 0, 0)


def test_16_bit_and_float_greyscale_are_rescaled_not_clipped():
    arr = np.array([[0, 65535, 257 * 100]], dtype=np.uint16)
    img16 = Image.frombytes("I;16", (3, 1), arr.astype("<u2").tobytes())
    assert img16.mode == "I;16"
    out = decode_image(img16)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 100]
    f = Image.frombytes("F", (2, 1), np.array([0.0, 128.0], dtype=np.float32).tobytes())
    assert [decode_image(f).getpixel((x, 0))[0] for x in range(2)] == [0, 128]


def test_input_forms(tmp_path):
    img = Image.new("RGB", (3, 2), (1, 2, 3))
    data = _png_bytes(img)
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "a.png"
    path.write_bytes(data)
    forms = [img, data, bytearray(data), {"bytes": data, "path": None}, {"bytes": None, "path": str(path)},
             str(path), path, np.array(img)]
    for form in forms:
        out = decode_image(form)
        assert out.mode == "RGB" and out.size == (3, 2) and out.getpixel((2, 1)) == (1, 2, 3), type(form)
    assert decode_image("sub/a.png", base_dir=tmp_path).getpixel((0, 0)) == (1, 2, 3)
    assert decode_image({"path": "sub/a.png"}, base_dir=tmp_path).size == (3, 2)
    jpeg_cmyk = _png_bytes(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), fmt="JPEG")
    assert decode_image(jpeg_cmyk).mode == "RGB"


def test_corrupt_and_missing_images_name_the_row(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"row 3 image 1: cannot decode image bytes"):
        decode_image(b"not an image", where="row 3 image 1")
    truncated = _png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:60]
    with pytest.raises(ImageDecodeError, match="row 5 image 0"):
        decode_image({"bytes": truncated, "path": None}, where="row 5 image 0")
    with pytest.raises(ImageDecodeError, match="does not exist"):
        decode_image(str(tmp_path / "nope.png"), where="row 1 image 0")
    with pytest.raises(ImageDecodeError, match="neither 'bytes' nor 'path'"):
        decode_image({"bytes": None, "path": None})
    with pytest.raises(ImageDecodeError, match="unsupported image type int"):
        decode_image(5)


def test_to_rgb_is_identity_for_rgb():
    img = Image.new("RGB", (2, 2))
    assert to_rgb(img) is img


@pytest.mark.parametrize("size,lo,hi,expect", [
    ((100, 50), None, 1250, (50, 25)),          # f = sqrt(1250/5000) = 0.5
    ((10, 10), 400, None, (20, 20)),            # f = 2
    ((30, 20), 1000, None, (38, 25)),           # f = sqrt(1000/600) = 1.29: 38.7 -> 38, 25.8 -> 25 (int truncation)
    ((56, 56), 3136, 12544, (56, 56)),          # inside the range: untouched
    ((1000, 10), None, 2000, (447, 4)),         # f = sqrt(0.2) = 0.447: 447.2 -> 447, 4.47 -> 4
])
def test_resize_by_pixels_matches_papo_formula(size, lo, hi, expect):
    assert resized_size(*size, lo, hi) == expect
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = resize_by_pixels(img, lo, hi)
    assert out.size == expect
    if expect != size:  # PIL default resample (bicubic for RGB), exactly as Image.resize without arguments
        assert np.array_equal(np.array(out), np.array(img.resize(expect)))
        assert np.array_equal(np.array(out), np.array(img.resize(expect, Image.Resampling.BICUBIC)))
    else:
        assert out is img


def test_resize_checks_max_then_min():
    # max first: 200x200 > 10000 -> 100x100; then min 5000 is satisfied (no second resize)
    assert resized_size(200, 200, 5000, 10000) == (100, 100)
    f = math.sqrt(10000 / 40000)
    assert (int(200 * f), int(200 * f)) == (100, 100)
