"""rayseg segment end to end on a local Ray: all four shard kinds mixed in one call, locally and on S3."""

from __future__ import annotations

import io
import json

import fsspec
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as coco_mask

from conftest import png_bytes, random_image, tar_bytes
from rayseg import cli, segment
from rayseg.stats import decode_png

K = 3


def build_archive(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str | None]:
    """Writes files, a tar, an HDF5 and a Parquet shard under root; returns {image_id suffix: expected error word}."""
    rng = np.random.default_rng(7)
    expected: dict[str, str | None] = {}
    fs.makedirs(f"{root}/files", exist_ok=True)
    for i, (h, w) in enumerate([(40, 50), (33, 21), (64, 64)]):
        fs.pipe_file(f"{root}/files/img{i}.png", png_bytes(random_image(rng, h, w)))
        expected[f"files/img{i}.png"] = None
    fs.pipe_file(f"{root}/files/photo.jpg", png_bytes(random_image(rng, 30, 30), ".jpg"))
    expected["files/photo.jpg"] = None
    fs.pipe_file(f"{root}/files/broken.png", b"\x89PNG\r\n\x1a\nthis is not really a png")
    expected["files/broken.png"] = "not a decodable image"
    fs.pipe_file(f"{root}/files/empty.jpg", b"")
    expected["files/empty.jpg"] = "empty"
    fs.pipe_file(f"{root}/files/notes.txt", b"not an image, ignored by extension")

    members = {f"sample{k}.png": png_bytes(random_image(rng, 24, 28)) for k in range(3)}
    members["sample1.json"] = b'{"meta": 1}'  # metadata beside the image: same sample
    members["sample9.txt"] = b"a sample without an image"
    fs.pipe_file(f"{root}/shard.tar", tar_bytes(members))
    expected.update({"shard.tar::sample0": None, "shard.tar::sample1": None, "shard.tar::sample2": None, "shard.tar::sample9": "no image member"})

    buf = io.BytesIO()  # h5py writes with seeks, which object stores don't offer: build in memory, upload
    with h5py.File(buf, "w") as h5:
        h5["images"] = rng.integers(0, 4000, (4, 20, 36), dtype=np.uint16)
    fs.pipe_file(f"{root}/shard.h5", buf.getvalue())
    expected.update({f"shard.h5::{i}": None for i in range(4)})

    with fs.open(f"{root}/shard.parquet", "wb") as f:
        pq.write_table(pa.table({"image": [png_bytes(random_image(rng, 16, 16)), None, b"garbage"]}), f)
    expected.update({"shard.parquet::0": None, "shard.parquet::1": "null", "shard.parquet::2": "not a decodable image"})
    return expected


def check_output(df: pd.DataFrame, expected: dict[str, str | None], prefix: str):
    assert len(df) == len(expected), "exactly one row per input image"
    assert df["image_id"].is_unique
    got = {iid[len(prefix) :]: iid for iid in df["image_id"]}
    assert set(got) == set(expected)
    rows = df.set_index("image_id")
    for suffix, err in expected.items():
        r = rows.loc[got[suffix]]
        if err is None:
            assert pd.isna(r["error"]), r["error"]
            mask = decode_png(r["mask_png"])
            assert mask.shape == (r["height"], r["width"])
            assert mask.max() < K
            assert sum(r["class_pixels"]) == r["height"] * r["width"]
            assert len(r["num_components"]) == K
            assert 0 < r["mean_confidence"] <= 1
            rle = {e["class"]: e for e in r["mask_rle"]}
            for c, e in rle.items():
                m = coco_mask.decode({"size": list(e["size"]), "counts": e["counts"].encode()})
                assert (m.astype(bool) == (mask == c)).all()
            assert set(rle) == set(np.unique(mask).tolist())
        else:
            assert err in r["error"], (suffix, r["error"])
            assert pd.isna(r["mask_png"]) and pd.isna(r["height"])


@pytest.mark.flow("embedded-ray")
def test_mixed_shards_locally(ray_local, tmp_path):
    fs = fsspec.filesystem("file")
    expected = build_archive(fs, str(tmp_path / "in"))
    out = tmp_path / "out"
    summary = segment(inputs=[str(tmp_path / "in")], output=str(out), model="unet", num_classes=K, input_size=32,
                      mask_format="both", batch_size=4)
    df = pd.read_parquet(out)  # the whole output folder reads as one table
    check_output(df, expected, f"file://{tmp_path}/in/")
    assert summary["images"] == len(expected) and summary["errors"] == sum(e is not None for e in expected.values())
    assert summary["ignored_files"] == [f"file://{tmp_path}/in/files/notes.txt"]
    assert json.loads((out / "_rayseg.json").read_text())["rows"] == len(expected)
    assert pads.dataset(str(out / "images")).schema.field("height").type == pa.int32()
    # where the start-up went: each step after the one before it, the last one when the rows were written
    t = summary["timeline_s"]
    steps = ["discovered", "model_checked", "ray_ready", "predictor_ready", "first_batch", "written"]
    assert [t[s] for s in steps] == sorted(t[s] for s in steps) and t["written"] <= summary["elapsed_s"], t
    assert t["dashboard"] is False
    # a tar sample's image_id names the shard and the member key; the shard column names the shard
    assert df.loc[df["image_id"].str.endswith("::sample0"), "shard"].item() == f"file://{tmp_path}/in/shard.tar"


@pytest.mark.flow("s3")
def test_inputs_and_output_on_s3(ray_local, s3):
    bucket, opts = s3
    fs = fsspec.filesystem("s3", **opts)
    expected = build_archive(fs, f"{bucket}/archive")
    out = f"{bucket}/results/run1"
    inputs = [f"{bucket}/archive/files/*.*", f"{bucket}/archive/shard.*"]  # globs
    segment(inputs=inputs, output=out, storage_options=opts, model="unet", num_classes=K, input_size=32, mask_format="both")
    with fs.open(f"{out}/_rayseg.json") as f:
        summary = json.load(f)
    table = pq.read_table(f"{out.removeprefix('s3://')}/images", filesystem=pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs)))
    check_output(table.to_pandas(), expected, f"{bucket}/archive/")
    assert summary["images"] == len(expected)
    assert "testing-secret-value" not in json.dumps(summary)


def test_existing_output_is_refused_without_overwrite(ray_local, tmp_path, capsys):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    out = tmp_path / "out"
    args = ["segment", str(img), "--output", str(out), "--model", "unet", "--num-classes", "2", "--input-size", "32", "--quiet"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 1
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert cli.main(args + ["--overwrite"]) == 0
    assert len(pd.read_parquet(out)) == 1


def test_pretrained_weights_offline_fail_with_one_sentence(tmp_path, capsys):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    code = cli.main(["segment", str(img), "--output", str(tmp_path / "o"), "--model", "lraspp_mobilenet_v3_large", "--weights", "DEFAULT"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not load torchvision weights" in err[0]


def test_cpu_actor_plan_uses_every_core_and_leaves_room_for_the_light_stages(ray_local):
    from rayseg.config import SegmentConfig
    from rayseg.runtime import BATCHES_PER_ACTOR, DECODE_CPUS, ENCODE_CPUS, READ_CPUS, actor_plan

    cpus = ray_local.cluster_resources()["CPU"]
    assert cpus == 2

    def plan(**kw):
        return actor_plan(SegmentConfig(inputs=("x",), output="y", device="cpu", **kw))

    pool, res, threads = plan()
    assert pool == (2, 2) and threads == 1  # one single-threaded model per core
    assert pool[1] * res["num_cpus"] + READ_CPUS + DECODE_CPUS <= cpus  # read and decode can run beside all of them
    assert ENCODE_CPUS <= cpus - pool[1] * res["num_cpus"]
    pool, res, threads = plan(actors="1")
    assert pool == (1, 1) and threads == 2 and res["num_cpus"] <= cpus - READ_CPUS - DECODE_CPUS
    pool, res, threads = plan(threads=2)
    assert pool == (1, 1) and threads == 2
    pool, res, threads = plan(actors="4")  # more actors than cores: each a smaller share, still within the machine
    assert pool == (4, 4) and threads == 1 and 4 * res["num_cpus"] < cpus
    # a job known to be a few batches starts one actor, not one per core; an unknown or larger one, one per core
    cfg = SegmentConfig(inputs=("x",), output="y", device="cpu")
    assert actor_plan(cfg, batches=1)[0] == actor_plan(cfg, batches=BATCHES_PER_ACTOR)[0] == (1, 1)
    assert actor_plan(cfg, batches=BATCHES_PER_ACTOR + 1)[0] == actor_plan(cfg, batches=None)[0] == (2, 2)
