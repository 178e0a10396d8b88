"""rayseg.shards: WebDataset tar, HDF5, Parquet and image files into rows, with one error row for what can't be read."""

from __future__ import annotations

import io
import os

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes, random_image, tar_bytes
from rayseg import shards
from rayseg.shards import ROW_COLUMNS, read_shard, read_units

RNG = np.random.default_rng(0)
PNG_A = png_bytes(random_image(RNG, 6, 5))
PNG_B = png_bytes(random_image(RNG, 4, 7))
JPG_C = png_bytes(random_image(RNG, 8, 8), ".jpg")


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def rows(url: str, kind: str, **kw) -> list[dict]:
    out = list(read_shard(url, kind, {}, **kw))
    assert all(set(r) == set(ROW_COLUMNS) for r in out)
    return out


def good(rs: list[dict]) -> list[dict]:
    return [r for r in rs if r["error"] is None]


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---- WebDataset tar -----------------------------------------------------------------------------------


def test_tar_members_are_grouped_into_samples_by_key(tmp_path):
    url = write(tmp_path / "s.tar", tar_bytes({"a.png": PNG_A, "a.json": b"{}", "a.cls": b"1",
                                               "dir/b.png": PNG_B, "dir/b.txt": b"hello", "c.jpg": JPG_C}))
    rs = rows(url, "tar")
    assert [r["image_id"] for r in rs] == [f"{url}::a", f"{url}::dir/b", f"{url}::c"]
    assert [r["data"] for r in rs] == [PNG_A, PNG_B, JPG_C]
    assert all(r["error"] is None and r["shard"] == url and r["format"] == "encoded" for r in rs)


def test_tar_extensions_are_matched_without_case(tmp_path):
    url = write(tmp_path / "s.tar", tar_bytes({"a.PNG": PNG_A, "b.Jpg": JPG_C}))
    assert [r["data"] for r in good(rows(url, "tar"))] == [PNG_A, JPG_C]


def test_tar_unsafe_member_names_are_refused_and_never_written(tmp_path, monkeypatch):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    url = write(tmp_path / "s.tar", tar_bytes({"../evil.png": PNG_A, "/abs/evil.png": PNG_A, "ok.png": PNG_B,
                                               "a/../../evil2.png": PNG_A, "C:/win.png": PNG_A}))
    rs = rows(url, "tar")
    assert [r["data"] for r in good(rs)] == [PNG_B]
    refused = [r for r in rs if r["error"]]
    assert len(refused) == 4
    assert all("unsafe path" in r["error"] and r["data"] == b"" for r in refused)
    found = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs}
    assert found == {"s.tar"}, "no member became a file"


def test_tar_repeated_keys(tmp_path):
    # `a` comes back twice: first with more metadata only (no new sample), then with a second image (its own sample)
    url = write(tmp_path / "s.tar", tar_bytes({"a.png": PNG_A, "b.png": PNG_B, "a.json": b"{}"}))
    rs = rows(url, "tar")
    assert [(r["image_id"], r["error"]) for r in rs] == [(f"{url}::a", None), (f"{url}::b", None)]

    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:  # tar_bytes takes a dict, so it can't hold one name twice
        for name, data in [("a.png", PNG_A), ("b.png", PNG_B), ("a.png", JPG_C), ("a.png", PNG_B)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    url = write(tmp_path / "twice.tar", buf.getvalue())
    rs = rows(url, "tar")
    assert [r["image_id"] for r in rs] == [f"{url}::a", f"{url}::b", f"{url}::a#2"]
    assert len({r["image_id"] for r in rs}) == len(rs), "image ids are unique"
    assert [r["data"] for r in rs[:2]] == [PNG_A, PNG_B]


def test_tar_sample_without_an_image_is_an_error_row(tmp_path):
    url = write(tmp_path / "s.tar", tar_bytes({"a.png": PNG_A, "b.json": b"{}", "b.cls": b"3"}))
    rs = rows(url, "tar")
    assert rs[0]["error"] is None
    assert rs[1]["image_id"] == f"{url}::b"
    assert "no image member" in rs[1]["error"] and ".cls" in rs[1]["error"] and ".json" in rs[1]["error"]


def test_empty_tar_says_so(tmp_path):
    url = write(tmp_path / "s.tar", tar_bytes({}))
    (r,) = rows(url, "tar")
    assert r["image_id"] == url and "holds no files" in r["error"]


def test_truncated_tar_keeps_the_samples_before_the_break(tmp_path):
    big = png_bytes(random_image(RNG, 64, 64))
    data = tar_bytes({"a.png": PNG_A, "b.png": PNG_B, "c.png": big, "d.png": PNG_A})
    cut = data.index(big) + len(big) // 2  # in the middle of c's data
    url = write(tmp_path / "s.tar", data[:cut])
    rs = rows(url, "tar")
    assert [r["data"] for r in good(rs)] == [PNG_A, PNG_B]
    (bad,) = [r for r in rs if r["error"]]
    assert bad is rs[-1]
    assert bad["error"].startswith("tar shard is unreadable after 2 members")
    assert bad["image_id"] == f"{url}::c"


@pytest.mark.parametrize("data", [b"this is not a tar archive at all" * 40, b""])
def test_not_a_tar_is_one_error_row(tmp_path, data):
    url = write(tmp_path / "s.tar", data)
    (r,) = rows(url, "tar")
    assert r["error"] and r["shard"] == url


# ---- HDF5 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int16, np.bool_])
@pytest.mark.parametrize("shape", [(7, 5, 4), (7, 5, 4, 3)])
def test_h5_reads_every_image_in_chunks_with_its_dtype(tmp_path, dtype, shape):
    arr = (RNG.random(shape) * 1000).astype(dtype)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("images", data=arr, chunks=(2, *shape[1:]))
    url = str(tmp_path / "s.h5")
    rs = list(shards.read_h5(url, {}, chunk=3))
    assert [r["image_id"] for r in rs] == [f"{url}::{i}" for i in range(7)]
    assert all(r["format"] == "npy" and r["error"] is None for r in rs)
    for i, r in enumerate(rs):
        got = npy(r["data"])
        assert got.dtype == arr.dtype and got.shape == shape[1:]
        np.testing.assert_array_equal(got, arr[i])


def test_h5_key_names_another_dataset(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((1, 2, 2), np.uint8))
        f.create_dataset("frames", data=np.ones((2, 3, 3), np.uint8))
    rs = rows(str(tmp_path / "s.h5"), "h5", h5_key="frames")
    assert len(rs) == 2 and npy(rs[0]["data"]).shape == (3, 3)


@pytest.mark.parametrize("build,message", [
    (lambda f: f.create_dataset("other", data=np.zeros((1, 2, 2))), "no dataset 'images' (datasets: other"),
    (lambda f: f.create_group("images"), "is a group, not a dataset"),
    (lambda f: f.create_dataset("images", data=np.array([[[b"a"]]], dtype="S1")), "non-numeric dtype"),
    (lambda f: f.create_dataset("images", data=np.zeros((3, 4), np.uint8)), "expected (N,H,W) or (N,H,W,C)"),
])
def test_h5_that_holds_no_images_is_one_error_row(tmp_path, build, message):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        build(f)
    (r,) = rows(str(tmp_path / "s.h5"), "h5")
    assert message in r["error"]


def test_truncated_h5_is_an_error_row(tmp_path):
    with h5py.File(tmp_path / "full.h5", "w") as f:
        f.create_dataset("images", data=RNG.integers(0, 255, (40, 32, 32), dtype=np.uint8))
    data = (tmp_path / "full.h5").read_bytes()
    url = write(tmp_path / "s.h5", data[: len(data) // 3])
    rs = rows(url, "h5")
    assert rs[-1]["error"].startswith("HDF5 shard is unreadable")
    assert all(r["error"] is None for r in rs[:-1])


# ---- Parquet ----------------------------------------------------------------------------------------


def test_parquet_image_column(tmp_path):
    url = str(tmp_path / "s.parquet")
    pq.write_table(pa.table({"id": [1, 2, 3], "image": [PNG_A, None, PNG_B]}), url, row_group_size=2)
    rs = rows(url, "parquet")
    assert [r["image_id"] for r in rs] == [f"{url}::0", f"{url}::1", f"{url}::2"]
    assert [r["data"] for r in rs] == [PNG_A, b"", PNG_B]
    assert rs[1]["error"] == "row 1 has a null 'image'"
    assert rs[0]["error"] is None and rs[2]["error"] is None


def test_parquet_other_image_column_and_wrong_types(tmp_path):
    url = str(tmp_path / "s.parquet")
    pq.write_table(pa.table({"jpeg": [JPG_C], "label": ["cat"]}), url)
    assert rows(url, "parquet", image_column="jpeg")[0]["data"] == JPG_C
    (r,) = rows(url, "parquet")
    assert "no column 'image' (columns: jpeg, label" in r["error"]
    (r,) = rows(url, "parquet", image_column="label")
    assert "holds str, not image bytes" in r["error"]


def test_broken_parquet_is_an_error_row(tmp_path):
    url = str(tmp_path / "full.parquet")
    pq.write_table(pa.table({"image": [PNG_A] * 10}), url)
    data = (tmp_path / "full.parquet").read_bytes()
    url = write(tmp_path / "s.parquet", data[: len(data) // 2])
    (r,) = rows(url, "parquet")
    assert r["error"].startswith("Parquet shard is unreadable at open")


# ---- image files, work units -------------------------------------------------------------------------


def test_image_file_and_missing_file(tmp_path):
    url = write(tmp_path / "a.png", PNG_A)
    assert rows(url, "image") == [{"image_id": url, "source": url, "shard": url, "data": PNG_A, "format": "encoded", "error": None}]
    (r,) = rows(str(tmp_path / "gone.png"), "image")
    assert "could not read the file" in r["error"] and "FileNotFoundError" in r["error"]
    assert "tries" not in r["error"], "a missing file is not retried"


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown shard kind"):
        list(read_shard("x.zip", "zip", {}))


def test_read_units_streams_fixed_size_batches(tmp_path):
    tar = write(tmp_path / "s.tar", tar_bytes({f"k{i}.png": PNG_A for i in range(5)}))
    images = [write(tmp_path / f"{i}.png", PNG_B) for i in range(3)]
    units = {"urls": np.array([[tar], images], dtype=object), "kind": np.array(["tar", "image"], dtype=object)}
    batches = list(read_units(units, {}, "images", "image", rows_per_batch=3))
    assert [len(b["image_id"]) for b in batches] == [3, 3, 2]
    assert all(set(b) == set(ROW_COLUMNS) for b in batches)
    ids = [i for b in batches for i in b["image_id"]]
    assert ids == [f"{tar}::k{i}" for i in range(5)] + images

