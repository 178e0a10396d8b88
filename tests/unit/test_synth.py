"""rayseg synth: deterministic archives in every layout, masks that match their images, local and memory:// URLs."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import cv2
import fsspec
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from rayseg import cli
from rayseg.synth import class_colour, class_names, make_blobs, make_sample, sample_keys, write_archive

# small images keep the whole module to about a second
SMALL = {"min_size": 32, "max_size": 48}
LAYOUTS = [("h5", True), ("h5", False), ("folders", True), ("tar", True), ("tar", False), ("files", False), ("parquet", False)]


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def decode(data: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


@pytest.fixture
def memory_url():
    root = f"memory://rayseg-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.mark.parametrize("layout,labelled", LAYOUTS)
def test_same_seed_writes_the_same_bytes(tmp_path, layout, labelled):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_archive(str(tmp_path / name), layout, 4, labelled=labelled, seed=seed, shards=2, metadata=True, **SMALL)
    a, b, c = (files_under(tmp_path / name) for name in "abc")
    assert a and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_h5_layout(tmp_path):
    summary = write_archive(str(tmp_path), "h5", 5, labelled=True, num_classes=4, shards=2, **SMALL)
    assert [Path(f).name for f in summary["files"]] == ["shard-00000.h5", "shard-00001.h5"]
    total = 0
    for name in summary["files"]:
        with h5py.File(name, "r") as f:
            images, masks = f["images"][:], f["masks"][:]
        assert images.dtype == np.uint8 and masks.dtype == np.uint8
        assert images.ndim == 4 and images.shape[3] == 3 and masks.shape == images.shape[:3]
        assert 32 <= images.shape[1] <= 48 and 32 <= images.shape[2] <= 48
        assert masks.max() < 4
        total += len(images)
    assert total == 5

    write_archive(str(tmp_path / "unlabelled"), "h5", 2, labelled=False, **SMALL)
    with h5py.File(tmp_path / "unlabelled" / "shard-00000.h5", "r") as f:
        assert list(f.keys()) == ["images"]


def test_folders_layout(tmp_path):
    write_archive(str(tmp_path), "folders", 3, labelled=True, num_classes=5, image_format="jpeg", **SMALL)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{k}.jpg" for k in sample_keys(3)]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [f"{k}.png" for k in sample_keys(3)]
    for key in sample_keys(3):
        image = decode((tmp_path / "images" / f"{key}.jpg").read_bytes())
        mask = decode((tmp_path / "masks" / f"{key}.png").read_bytes())
        assert mask.ndim == 2 and mask.dtype == np.uint8 and mask.max() < 5
        assert image.shape == (*mask.shape, 3)


def test_tar_layout_follows_webdataset(tmp_path):
    write_archive(str(tmp_path / "labelled"), "tar", 2, labelled=True, **SMALL)
    write_archive(str(tmp_path / "plain"), "tar", 2, labelled=False, metadata=True, **SMALL)
    with tarfile.open(tmp_path / "labelled" / "shard-00000.tar") as tar:
        assert tar.getnames() == ["img-000000.png", "img-000000.mask.png", "img-000001.png", "img-000001.mask.png"]
        assert {(m.mtime, m.uid, m.gid) for m in tar.getmembers()} == {(0, 0, 0)}
        assert decode(tar.extractfile("img-000001.mask.png").read()).ndim == 2
    with tarfile.open(tmp_path / "plain" / "shard-00000.tar") as tar:
        assert tar.getnames() == ["img-000000.png", "img-000000.json", "img-000001.png", "img-000001.json"]
        assert json.loads(tar.extractfile("img-000001.json").read()) == {"key": "img-000001"}


def test_files_and_parquet_layouts(tmp_path):
    write_archive(str(tmp_path / "files"), "files", 3, labelled=False, **SMALL)
    assert sorted(files_under(tmp_path / "files")) == [f"{k}.png" for k in sample_keys(3)]

    summary = write_archive(str(tmp_path / "pq"), "parquet", 5, labelled=False, shards=2, **SMALL)
    tables = [pq.read_table(f) for f in summary["files"]]
    assert all(t.column_names == ["key", "image"] for t in tables)
    assert [str(t.schema.field("image").type) for t in tables] == ["binary", "binary"]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert keys == sample_keys(5)
    image = decode(tables[1].column("image")[0].as_py(), cv2.IMREAD_COLOR)
    assert image.ndim == 3 and image.shape[2] == 3


def test_a_sample_does_not_depend_on_sharding(tmp_path):
    def members(url):
        out = {}
        for shard in sorted(Path(url).glob("*.tar")):
            with tarfile.open(shard) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
        return out

    write_archive(str(tmp_path / "one"), "tar", 5, labelled=True, shards=1, **SMALL)
    write_archive(str(tmp_path / "three"), "tar", 5, labelled=True, shards=3, **SMALL)
    assert members(tmp_path / "one") == members(tmp_path / "three")


def test_masks_match_images():
    """Shapes are saturated colours on a greyish background, so saturation alone must reproduce the mask."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        image, mask = make_sample(rng, 64, 80, num_classes=5)
        assert image.shape == (64, 80, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 80) and mask.dtype == np.uint8 and mask.max() < 5
        assert mask.any()
        rgb = image.astype(np.int16)
        saturated = rgb.max(axis=2) - rgb.min(axis=2) > 110
        assert (saturated == (mask > 0)).mean() > 0.99
        for c in np.unique(mask[mask > 0]):
            mean = rgb[mask == c].mean(axis=0)
            nearest = min(range(1, 5), key=lambda k: np.linalg.norm(mean - class_colour(k)))
            assert nearest == c  # each class keeps its own colour


def test_blobs_are_bright_on_dark():
    image, mask = make_blobs(np.random.default_rng(3), 48, 64)
    assert image.shape == (48, 64, 3) and set(np.unique(mask)) == {0, 1}
    assert image[mask == 1].mean() > image[mask == 0].mean() + 80


def test_class_names():
    assert class_names(3) == ["background", "disc", "rectangle"]
    assert class_names(7)[6] == "disc-2"
    assert class_names(2, "blobs") == ["background", "blob"]


def test_memory_urls(memory_url):
    summary = write_archive(memory_url, "h5", 3, labelled=True, shards=2, **SMALL)
    write_archive(memory_url + "/tar", "tar", 2, labelled=True, **SMALL)
    fs, _ = fsspec.core.url_to_fs(memory_url)
    assert summary["files"] == [f"{memory_url}/shard-00000.h5", f"{memory_url}/shard-00001.h5"]
    counts = []
    for url in summary["files"]:
        with fs.open(url, "rb") as f, h5py.File(io.BytesIO(f.read()), "r") as h5:
            assert h5["masks"].shape == h5["images"].shape[:3]
            counts.append(len(h5["images"]))
    assert sum(counts) == 3
    assert fs.exists(f"{memory_url}/tar/shard-00000.tar")


def test_cli_writes_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["synth", str(out), "--layout", "parquet", "--count", "3", "--shards", "2", "--min-size", "32", "--max-size", "32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] is False and summary["count"] == 3  # parquet holds no masks, so that is the default
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]


@pytest.mark.parametrize("args,message", [
    (["--layout", "parquet", "--labelled"], "layout parquet holds no masks"),
    (["--layout", "files", "--labelled"], "layout files holds no masks"),
    (["--count", "0"], "--count must be at least 1"),
    (["--min-size", "90", "--max-size", "80"], "--min-size 90 is larger than --max-size 80"),
    (["--num-classes", "1"], "--num-classes must be between 2 and 255"),
    (["--num-classes", "256"], "--num-classes must be between 2 and 255"),
    (["--generator", "blobs", "--num-classes", "3"], "blobs generator has exactly 2 classes"),
])
def test_cli_rejects_bad_options_in_one_line(tmp_path, capsys, args, message):
    assert cli.main(["synth", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayseg synth: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

