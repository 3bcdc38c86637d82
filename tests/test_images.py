"""ldm.images.decode_image: every pixel format a user's files come in, against the expected pixels."""

import io

import numpy as np
import pytest
from PIL import Image

from ldm.images import decode_grey, decode_image


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_16_bit_grey_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = pixels(decode_image(data))
    expected = np.round(ramp.astype(float) * 255 / 65535)
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    # convert("RGB") on such a file gives 99% white; the mid-grey must stay mid-grey
    assert (out[..., 0] == 255).mean() < 0.01


def test_32_bit_int_and_float_grey():
    a = np.full((4, 4), 32768, dtype=np.int32)
    assert abs(pixels(decode_image(Image.fromarray(a, mode="I")))[0, 0, 0] - 128) <= 1
    f = np.full((4, 4), 0.25, dtype=np.float32)
    assert abs(pixels(decode_image(Image.fromarray(f, mode="F")))[0, 0, 0] - 64) <= 1


def test_rgb_png_and_greyscale_png_pass_through_exactly():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert (pixels(decode_image(encode(Image.fromarray(rgb)))) == rgb).all()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = pixels(decode_image(encode(Image.fromarray(grey, mode="L"))))
    assert (out[..., 1] == grey).all()


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    out = pixels(decode_image(encode(cmyk, "JPEG", quality=95)))
    r, g, b = out[8, 8]
    assert r > 240 and g < 15 and b < 15


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    out = pixels(decode_image(encode(rgba)))
    assert tuple(out[4, 4]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)
    half = Image.new("LA", (2, 2), (0, 128))  # black at half alpha -> mid grey
    assert abs(pixels(decode_image(encode(half)))[0, 0, 0] - 127) <= 1


def test_palette_png_with_transparent_index():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 255, 0] + [255, 0, 255] * 255)  # index 0 green, the rest magenta
    p.putpixel((1, 1), 1)
    data = encode(p, transparency=0)
    out = pixels(decode_image(data))
    assert tuple(out[0, 0]) == (255, 255, 255)  # index 0 is transparent: background, not green
    assert tuple(out[1, 1]) == (255, 0, 255)


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    out = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (32, 64)
    a = pixels(out)
    assert a[4, 28, 0] > 200 and a[4, 28, 2] < 60  # the red block is now top-right
    assert a[4, 4, 2] > 200  # top-left is blue


def test_masks_decode_to_grey():
    m = np.zeros((4, 4), dtype=np.uint16)
    m[:2] = 65535
    out = np.asarray(decode_grey(encode(Image.fromarray(m))))
    assert out.dtype == np.uint8 and out[0, 0] == 255 and out[3, 3] == 0


def test_bad_files_name_the_problem(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not an image file"):
        decode_image(text)
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        decode_image(tmp_path)
    with pytest.raises(ValueError, match="image file not found"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
    good = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_image(good[: len(good) // 2])
