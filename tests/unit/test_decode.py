import io

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes
from rayseg.decode import DecodeError, decode, decode_batch, to_uint8


def test_colour_png_comes_out_rgb():
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's BGR order
    rgb = decode(png_bytes(bgr), "encoded")
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 2] == 200).all() and (rgb[..., 0] == 0).all()


def test_16bit_grey_scaled_to_8bit():
    img = np.array([[0, 257, 65535]], np.uint16)
    out = decode(png_bytes(img), "encoded")
    assert out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 1, 255]


def test_rgba_drops_alpha_and_palette_expands():
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 1] = 90
    assert decode(png_bytes(rgba), "encoded")[0, 0].tolist() == [0, 90, 0]
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 7, np.uint8)).convert("P").save(buf, "PNG")
    assert decode(buf.getvalue(), "encoded").shape == (6, 6, 3)


def test_exif_orientation_applied():
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # 20 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert decode(buf.getvalue(), "encoded").shape == (20, 10, 3)


@pytest.mark.parametrize(
    "data,words",
    [(b"", "empty"), (b"not an image at all", "not a decodable image"), (png_bytes(np.zeros((50, 50, 3), np.uint8))[:60], "corrupt")],
)
def test_bad_bytes_raise_a_clear_error(data, words):
    with pytest.raises(DecodeError, match=words):
        decode(data, "encoded")


def test_pixel_limit_checked_from_the_header():
    with pytest.raises(DecodeError, match="over the limit"):
        decode(png_bytes(np.zeros((100, 100, 3), np.uint8)), "encoded", max_pixels=5000)


@pytest.mark.parametrize(
    "arr,expected",
    [
        (np.array([[0.0, 0.5, 1.0]]), [0, 128, 255]),
        (np.array([[-1.0, 0.0, 1.0]]), [0, 128, 255]),  # outside [0, 1]: min-max
        (np.array([[10, 20, 30]], np.int32), [0, 128, 255]),
        (np.array([[True, False, True]]), [255, 0, 255]),
        (np.array([[5, 5, 5]], np.int16), [0, 0, 0]),  # constant: zeros
        (np.array([[np.nan, 0.0, 1.0]]), [0, 0, 255]),
    ],
)
def test_array_scaling_rules(arr, expected):
    assert to_uint8(arr)[0].tolist() == expected


def test_npy_arrays_from_hdf5_decode():
    buf = io.BytesIO()
    np.save(buf, np.full((4, 6), 1000, np.uint16))
    out = decode(buf.getvalue(), "npy")
    assert out.shape == (4, 6, 3) and out[0, 0, 0] == round(1000 / 257)


def test_decode_batch_keeps_bad_rows_flowing():
    good = png_bytes(np.full((3, 4, 3), 9, np.uint8))
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "source": np.array(["a", "b", "c"], dtype=object),
        "shard": np.array(["a", "b", "c"], dtype=object),
        "data": np.array([good, b"junk", b""], dtype=object),
        "format": np.array(["encoded"] * 3, dtype=object),
        "error": np.array([None, None, "could not read the file"], dtype=object),
    }
    out = decode_batch(batch)
    assert out["error"][0] is None and out["image"][0].shape == (3, 4, 3)
    assert "not a decodable image" in out["error"][1]
    assert out["error"][2] == "could not read the file"  # an earlier stage's error is kept as is
    assert out["height"].tolist() == [3, 0, 0]
    assert "data" not in out
