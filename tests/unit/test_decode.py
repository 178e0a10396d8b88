import io

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes
from rayseg.decode import DecodeError, decode, decode_batch, load, to_uint8


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
    assert out["dtype"].tolist() == ["uint8", "uint8", "uint8"]
    assert "not a decodable image" in out["error"][1]
    assert out["error"][2] == "could not read the file"  # an earlier stage's error is kept as is
    assert out["height"].tolist() == [3, 0, 0]
    assert "data" not in out


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def test_load_keeps_16bit_values_and_grey_as_one_channel():
    img = np.array([[0, 235, 65535]], np.uint16)
    out = load(png_bytes(img), "encoded")
    assert out.dtype == np.uint16 and out.shape == (1, 3, 1) and out[0, :, 0].tolist() == [0, 235, 65535]
    colour = np.random.default_rng(0).integers(0, 65535, (5, 6, 3)).astype(np.uint16)
    rgb = load(png_bytes(colour), "encoded")  # written as BGR by OpenCV, read back as RGB
    assert rgb.dtype == np.uint16 and np.array_equal(rgb, colour[..., ::-1])


def test_float32_zstd_tiled_bigtiff_decodes_exactly():
    arr = np.random.default_rng(0).normal(100, 30, (100, 70)).astype(np.float32)
    data = tiff_bytes(arr, bigtiff=True, tile=(32, 32), compression="zstd")
    assert data[:4] == b"II+\x00"  # BigTIFF
    out = load(data, "encoded")
    assert out.dtype == np.float32 and out.shape == (100, 70, 1) and np.array_equal(out[..., 0], arr)


def test_ome_tiff_channels_become_the_last_axis():
    arr = np.random.default_rng(1).integers(0, 4000, (5, 40, 30)).astype(np.uint16)
    out = load(tiff_bytes(arr, ome=True, metadata={"axes": "CYX"}, compression="lzw"), "encoded")
    assert out.shape == (40, 30, 5) and out.dtype == np.uint16 and np.array_equal(np.moveaxis(out, 2, 0), arr)


def test_multipage_and_signed_tiff():
    pages = np.random.default_rng(2).integers(-1000, 2000, (3, 20, 10)).astype(np.int16)
    out = load(tiff_bytes(pages, compression="deflate"), "encoded")
    assert out.shape == (20, 10, 3) and out.dtype == np.int16 and np.array_equal(np.moveaxis(out, 2, 0), pages)
    assert decode(tiff_bytes(pages[0]), "encoded").shape == (20, 10, 3)  # the picture of it, for reports


def test_tiff_orientation_is_applied():
    rgb = np.zeros((20, 30, 3), np.uint8)
    out = load(tiff_bytes(rgb, photometric="rgb", extratags=[(274, "H", 1, 6, True)]), "encoded")
    assert out.shape == (30, 20, 3)


def test_tiff_pixel_limit_is_checked_before_any_pixel_is_decompressed(monkeypatch):
    import tifffile

    data = tiff_bytes(np.zeros((300, 200), np.uint16), tile=(64, 64), compression="zstd")

    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", refuse)
    with pytest.raises(DecodeError, match="200x300 = 60,000 pixels, over the limit"):
        load(data, "encoded", max_pixels=50_000)


def test_arrays_keep_every_channel():
    buf = io.BytesIO()
    np.save(buf, np.ones((4, 6, 12), np.float64))
    out = load(buf.getvalue(), "npy")
    assert out.shape == (4, 6, 12) and out.dtype == np.float32
    buf = io.BytesIO()
    np.save(buf, np.ones((4, 6, 65), np.uint8))
    with pytest.raises(DecodeError, match="65 channels"):
        load(buf.getvalue(), "npy")
