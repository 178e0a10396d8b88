"""Odd and broken inputs: one `segment` over a corpus that mixes them with good images in the same folder and
shards, then one assertion per case. Every input yields exactly one row: a mask when the image is valid, an
`error` sentence naming what was wrong when it is not; its neighbours in the batch and shard are unharmed.

    pytest tests/system/test_bad_inputs.py
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import png_bytes, random_image, tar_bytes
from rayseg import segment
from rayseg.stats import decode_png

MAX_PIXELS = 5000  # small, so a 100x100 image is over the limit without a big file
ESCAPE = "rayseg-escaped-7c1e.png"  # what a tar member with '..' in its path would create if it were extracted


def _pil(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_header_png() -> bytes:
    """A valid PNG signature and IHDR (correct CRC) declaring 100000 x 100000 RGB pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def _h5(path: Path, **datasets) -> None:
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value


def build_corpus(root: Path) -> dict[str, tuple]:
    """Writes the corpus; returns {image_id relative to root: ("ok", (height, width)) | ("error", words...)}."""
    rng = np.random.default_rng(5)
    root.mkdir()
    exp: dict[str, tuple] = {}

    def put(name: str, data: bytes, *expect):
        (root / name).write_bytes(data)
        exp[name] = expect

    # valid images, and odd but valid ones
    for i in range(4):
        put(f"good{i}.png", png_bytes(random_image(rng, 20, 24)), "ok", (20, 24))
    put("one_by_one.png", png_bytes(random_image(rng, 1, 1)), "ok", (1, 1))
    put("one_by_n.png", png_bytes(random_image(rng, 1, 37)), "ok", (1, 37))
    put("n_by_one.png", png_bytes(random_image(rng, 29, 1)), "ok", (29, 1))
    put("gray16.png", png_bytes(rng.integers(0, 65536, (18, 22), dtype=np.uint16)), "ok", (18, 22))
    put("rgb16.png", png_bytes(rng.integers(0, 65536, (18, 22, 3), dtype=np.uint16)), "ok", (18, 22))
    put("gray.png", png_bytes(rng.integers(0, 256, (15, 16), dtype=np.uint8)), "ok", (15, 16))
    put("rgba.png", png_bytes(rng.integers(0, 256, (14, 13, 4), dtype=np.uint8)), "ok", (14, 13))
    put("palette.png", _pil(Image.fromarray(random_image(rng, 12, 19)).convert("P"), "PNG"), "ok", (12, 19))
    put("cmyk.jpg", _pil(Image.fromarray(random_image(rng, 16, 21)).convert("CMYK"), "JPEG"), "ok", (16, 21))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    put("exif6.jpg", _pil(Image.fromarray(random_image(rng, 20, 30)), "JPEG", exif=exif), "ok", (30, 20))

    # invalid files
    jpg = png_bytes(random_image(rng, 40, 40), ".jpg")
    png = png_bytes(random_image(rng, 40, 40))
    put("zero.png", b"", "error", "empty", "0 bytes")
    put("truncated.jpg", jpg[: len(jpg) * 3 // 4], "error", "JPEG", "truncated")
    put("truncated.png", png[: len(png) // 2], "error", "PNG", "truncated")
    put("random.jpg", rng.integers(0, 256, 700, dtype=np.uint8).tobytes(), "error", "not a decodable image")
    put("text.png", b"Hello! I am a text file that calls itself a PNG.\n", "error", "not a decodable image")
    put("huge_header.png", _huge_header_png(), "error", "100000x100000", "over the limit", "--max-pixels")
    put("over_limit.png", png_bytes(random_image(rng, 100, 100)), "error", "100x100", "over the limit", "--max-pixels")

    # HDF5: a good shard, then one per way a shard can be wrong
    _h5(root / "good.h5", images=rng.integers(0, 256, (3, 10, 12), dtype=np.uint8))
    exp.update({f"good.h5::{i}": ("ok", (10, 12)) for i in range(3)})
    put("corrupt.h5", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "error", "HDF5", "unreadable")
    _h5(root / "wrong_key.h5", pixels=rng.integers(0, 256, (2, 8, 8), dtype=np.uint8))
    exp["wrong_key.h5"] = ("error", "no dataset 'images'", "pixels", "--h5-key")
    _h5(root / "strings.h5", images=np.array([b"abc", b"def"], dtype="S3"))
    exp["strings.h5"] = ("error", "non-numeric")
    _h5(root / "flat.h5", images=rng.integers(0, 256, (4, 10), dtype=np.uint8))
    exp["flat.h5"] = ("error", "shape (4, 10)", "expected")

    # tar: a sample with only a .txt beside good ones; a path-traversal member; a shard cut short
    ok_png = png_bytes(random_image(rng, 11, 9))
    put("text_only.tar", tar_bytes({"a.png": ok_png, "b.txt": b"caption only", "c.png": ok_png}), "ok", (11, 9))
    exp.pop("text_only.tar")
    exp.update({"text_only.tar::a": ("ok", (11, 9)), "text_only.tar::b": ("error", "no image member", "'b'"),
                "text_only.tar::c": ("ok", (11, 9))})
    escape = f"../../{ESCAPE}"
    (root / "traversal.tar").write_bytes(tar_bytes({"ok.png": ok_png, "../../etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
                                                    escape: ok_png, "ok2.png": ok_png}))
    exp.update({"traversal.tar::ok": ("ok", (11, 9)), "traversal.tar::ok2": ("ok", (11, 9)),
                "traversal.tar::../../etc/passwd": ("error", "../../etc/passwd", "unsafe"),
                f"traversal.tar::{escape}": ("error", escape, "unsafe")})
    full = tar_bytes({"t0.png": ok_png, "t1.png": png_bytes(random_image(rng, 64, 64)), "t2.png": ok_png})
    (root / "truncated.tar").write_bytes(full[: 512 + 1024 + 512 + 1000])  # t0 whole, t1's header and part of its data
    exp.update({"truncated.tar::t0": ("ok", (11, 9)), "truncated.tar::t1": ("error", "tar shard", "unreadable", "after 1 member")})

    # Parquet: nulls between good images
    pq.write_table(pa.table({"image": [ok_png, None, ok_png, None]}), root / "nulls.parquet")
    exp.update({"nulls.parquet::0": ("ok", (11, 9)), "nulls.parquet::1": ("error", "null", "'image'"),
                "nulls.parquet::2": ("ok", (11, 9)), "nulls.parquet::3": ("error", "null", "'image'")})
    return exp


@pytest.fixture(scope="module")
def corpus_run(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    root = base / "corpus"
    expected = build_corpus(root)
    out = base / "out"
    summary = segment(inputs=[str(root)], output=str(out), model="unet", num_classes=2, input_size=32, batch_size=4,
                      max_pixels=MAX_PIXELS, mask_format="png", quiet=True)
    df = pd.read_parquet(out / "images")
    prefix = f"file://{root}/"
    assert df["image_id"].str.startswith(prefix).all()
    df["key"] = df["image_id"].str.slice(len(prefix))
    return expected, df.set_index("key"), summary, base


@pytest.mark.flow("bad-inputs")
def test_one_row_per_input_and_no_duplicates(corpus_run):
    expected, df, summary, _ = corpus_run
    assert df.index.is_unique, df.index[df.index.duplicated()].tolist()
    assert sorted(df.index) == sorted(expected)
    assert summary["rows"] == len(expected)
    assert summary["errors"] == sum(e[0] == "error" for e in expected.values())


def test_valid_odd_images_are_segmented(corpus_run):
    expected, df, _, _ = corpus_run
    for key, (status, *rest) in expected.items():
        if status != "ok":
            continue
        r = df.loc[key]
        assert pd.isna(r["error"]), (key, r["error"])
        assert (r["height"], r["width"]) == rest[0], key
        mask = decode_png(r["mask_png"])
        assert mask.shape == rest[0], key
        assert sum(r["class_pixels"]) == rest[0][0] * rest[0][1], key


def test_exif_orientation_is_applied(corpus_run):
    _, df, _, _ = corpus_run
    r = df.loc["exif6.jpg"]
    assert (r["height"], r["width"]) == (30, 20)  # stored 30 wide, 20 high; orientation 6 turns it upright


@pytest.mark.parametrize("case", ["zero.png", "truncated.jpg", "truncated.png", "random.jpg", "text.png", "huge_header.png",
                                  "over_limit.png", "corrupt.h5", "wrong_key.h5", "strings.h5", "flat.h5",
                                  "text_only.tar::b", "traversal.tar::../../etc/passwd",
                                  f"traversal.tar::../../{ESCAPE}", "truncated.tar::t1", "nulls.parquet::1"])
def test_invalid_input_is_one_clear_error_row(corpus_run, case):
    expected, df, _, _ = corpus_run
    r = df.loc[case]
    err = r["error"]
    assert isinstance(err, str) and len(err.split()) >= 3, (case, err)  # a sentence, not a code
    for word in expected[case][1:]:
        assert word in err, (case, word, err)
    assert pd.isna(r["mask_png"]) and pd.isna(r["height"]), case
    assert "Traceback" not in err and "\n" not in err


def test_tar_member_paths_never_become_files(corpus_run, tmp_path):
    _, _, _, base = corpus_run
    # '../../X' relative to the corpus, the cwd, the output or /tmp: none may exist
    for start in (base / "corpus", base / "out", base / "out" / "images", Path.cwd(), Path("/tmp"), tmp_path):
        assert not (start / ".." / ".." / ESCAPE).resolve().exists()
    assert not any(p.name == ESCAPE for p in base.rglob("*"))
