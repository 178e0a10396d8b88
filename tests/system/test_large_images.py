"""A huge image through `rayseg segment`: its regions spread over two actors beside an ordinary image, the mask
store equals the one-actor sliding window, two runs taking regions in different orders write identical stores, and
its objects, merged across region borders, are OpenCV's on the whole mask."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import png_bytes
from large_images import balance, balanced, ihc, tiled_picture, write_pyramid, write_slide
from process_memory import peaks_during, segment_cli
from rayseg import bigimage, maskstore, segment
from rayseg.config import PredictConfig, ReportConfig
from rayseg.models import ModelCard, UNet, load_bundle, save_checkpoint
from rayseg.predict import Predictor
from rayseg.report import report
from rayseg.table import read_table

SIDE, TILE, REGION = 1536, 256, 512


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.flow("large-image-regions")
def test_huge_image_regions_over_two_actors(ray_local, tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = tiled_picture(SIDE)
    write_pyramid(inputs / "slide.tif", img, levels=3)
    (inputs / "small.png").write_bytes(png_bytes(ihc()[:200, :300]))
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(balanced("lraspp_mobilenet_v3_large"), ModelCard("lraspp_mobilenet_v3_large", 2, input_size=TILE), ckpt)

    plan, order = bigimage.plan, random.Random(0)

    def shuffled(*args):  # each run hands its regions to the pool in another order
        shards, large, rows = plan(*args)
        return shards, large, order.sample(rows, len(rows))

    monkeypatch.setattr(bigimage, "plan", shuffled)
    kw = dict(inputs=(str(inputs),), checkpoint=ckpt, tile=TILE, overlap=0.25, region_size=REGION, background="none",
              actors="2", batch_size=8, objects=True, quiet=True)
    first = segment(output=str(tmp_path / "a"), **kw)
    second = segment(output=str(tmp_path / "b"), **kw)
    for summary in (first, second):
        assert summary["images"] == 2 and summary["errors"] == 0 and summary["large_images"] == 1 and summary["regions"] == (SIDE // REGION) ** 2

    rows = read_table(str(tmp_path / "a")).to_table().to_pandas().set_index("image_id")
    big = rows.loc[[i for i in rows.index if i.endswith("slide.tif")][0]]
    small = rows.loc[[i for i in rows.index if i.endswith("small.png")][0]]
    assert big["mask_png"] is None and big["mask_url"].endswith(".zarr") and big["regions_skipped"] == 0
    assert small["mask_png"] is not None and pd.isna(small["mask_url"])
    assert (big["height"], big["width"]) == (SIDE, SIDE) and sum(big["class_pixels"]) == SIDE * SIDE

    stores_a, stores_b = files_of(tmp_path / "a" / "masks"), files_of(tmp_path / "b" / "masks")
    assert stores_a.keys() == stores_b.keys() and all(stores_a[k] == stores_b[k] for k in stores_a), "identical stores"
    assert any("/c/" in k for k in stores_a)

    torch.set_num_threads(1)  # as each actor runs
    reference, _, _ = Predictor(load_bundle(ckpt), PredictConfig(tile=TILE, overlap=0.25, batch_size=8), threads=1).tiled(img)
    mask = maskstore.read_mask(big["mask_url"])
    assert 0.1 < reference.mean() < 0.9 and int((mask != reference).sum()) == 0
    assert list(big["class_pixels"]) == np.bincount(reference.ravel(), minlength=2).tolist()
    n, _, stats, _ = cv2.connectedComponentsWithStats((reference == 1).astype(np.uint8), connectivity=8)
    objects = read_table(str(tmp_path / "a"), table="objects").to_table().to_pandas()
    mine = objects[objects["image_id"] == big.name]
    assert len(mine) == n - 1 == big["num_components"][1]
    assert sorted(mine["area"]) == sorted(stats[1:, cv2.CC_STAT_AREA].tolist())

    # the report overlays a coarse level of the store on the slide's overview, never reading either whole
    page = report(ReportConfig(output=str(tmp_path / "a"), html=str(tmp_path / "report.html")))
    html = (tmp_path / "report.html").read_text()
    assert page["overlays"] == 2 and "slide.tif" in html and "not readable" not in html


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not os.environ.get("RAYSEG_SLOW_TESTS"), reason="about 6 minutes on 2 cores; set RAYSEG_SLOW_TESTS=1")
def test_a_32768_slide_segments_by_region_in_the_memory_of_a_16384_one(tmp_path):
    """Region mode's memory does not follow the slide's size: the largest process of a `rayseg segment` run (its
    own embedded Ray, two actors) on a 32768² SVS-like pyramid peaks within 10% of the same run on a 16384² one."""
    peaks, summaries = {}, {}
    for side in (16384, 32768):
        folder = tmp_path / f"in{side}"
        folder.mkdir()
        write_slide(folder / "slide.svs", side)
        out = tmp_path / f"out{side}"
        peaks[side] = peaks_during(lambda: segment_cli(folder, out, "--model", "pointwise", "--num-classes", "2", "--actors", "2"))
        summaries[side] = json.loads((out / "_rayseg.json").read_text())
        s = summaries[side]
        assert (s["images"], s["errors"], s["large_images"]) == (1, 0, 1)
        assert 0 < s["regions"] < (side // 1024) ** 2, s  # regions of 1024 ran, those of glass skipped
    (_, small), (_, large) = peaks[16384], peaks[32768]
    print(f"largest process: 16384² {small / 2**20:.0f} MiB ({summaries[16384]['regions']} regions), "
          f"32768² {large / 2**20:.0f} MiB ({summaries[32768]['regions']} regions); "
          f"runs {summaries[16384]['elapsed_s']} s and {summaries[32768]['elapsed_s']} s")
    assert large <= 1.10 * small


@pytest.mark.flow("nightly-large-image")
def test_nightly_segments_a_huge_image_by_region_and_commits_its_row_once(ray_local, tmp_path):
    """`rayseg nightly` on a folder holding a pyramid and two PNGs: the pyramid's regions go over the pool beside
    the PNGs, its one row (a mask store under OUT/masks/RUN_ID/, equal to the one-actor sliding window) commits
    with the others; a rerun finds nothing new; a new model replaces the row and points it at a new store, while
    the old store stays as the last snapshot read it."""
    from rayseg.nightly import nightly

    side, tile, region = 1024, 128, 512
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = tiled_picture(side)
    write_pyramid(inputs / "slide.tif", img, levels=2, tile=128)
    for i in range(2):
        (inputs / f"small{i}.png").write_bytes(png_bytes(ihc()[:100 + 20 * i, :150]))
    torch.manual_seed(0)
    model = UNet(2).eval()  # rayseg's own UNet as a checkpoint holds it, biased to give both classes
    model = balance(model, model.head.bias, ihc()[:256, :256])
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(model, ModelCard("unet", 2, input_size=tile), ckpt)
    out = str(tmp_path / "out")
    kw = dict(inputs=(str(inputs),), output=out, checkpoint=ckpt, tile=tile, overlap=0.25, region_size=region,
              background="none", batch_size=4, quiet=True)

    first = nightly(**kw)
    assert (first["rows"], first["errors"], first["large_images"], first["regions"]) == (3, 0, 1, (side // region) ** 2)
    rows = read_table(out).to_table().to_pandas().set_index("image_id")
    assert len(rows) == 3 and rows.index.is_unique
    big = rows.loc[[i for i in rows.index if i.endswith("slide.tif")][0]]
    assert big["mask_png"] is None and big["regions_skipped"] == 0
    assert f"/masks/{first['run_id']}/" in big["mask_url"] and big["shard"] == big.name
    assert all(pd.isna(rows.loc[i, "mask_url"]) and rows.loc[i, "mask_png"] is not None for i in rows.index if i.endswith(".png"))
    torch.set_num_threads(1)
    reference, _, _ = Predictor(load_bundle(ckpt), PredictConfig(tile=tile, overlap=0.25, batch_size=4), threads=1).tiled(img)
    first_mask = maskstore.read_mask(big["mask_url"])
    assert 0.1 < reference.mean() < 0.9 and int((first_mask != reference).sum()) == 0
    assert list(big["class_pixels"]) == np.bincount(reference.ravel(), minlength=2).tolist()

    assert nightly(**kw)["nothing_new"]  # every shard, the huge image's included, is committed

    with torch.no_grad():
        model.head.bias += torch.tensor([0.3, -0.3])  # another model: more background
    save_checkpoint(model, ModelCard("unet", 2, input_size=tile), ckpt)
    second = nightly(**kw)
    assert (second["rows"], second["large_images"]) == (3, 1)
    rows = read_table(out).to_table().to_pandas().set_index("image_id")
    assert len(rows) == 3 and rows.index.is_unique
    again = rows.loc[big.name]
    assert f"/masks/{second['run_id']}/" in again["mask_url"] and again["class_pixels"][0] > big["class_pixels"][0]
    assert int((maskstore.read_mask(big["mask_url"]) != first_mask).sum()) == 0  # the first night's store is kept

    # vacuum: once the replaced row's file goes, its store goes with it; a store no commit ever named (a killed
    # run's) goes with a full vacuum; the current row's store stays
    from rayseg.table import read_state, vacuum

    orphan = tmp_path / "out" / "masks" / "20990101T000000Z-deadbeef" / "slide-000000000000.zarr"
    shutil.copytree(Path(again["mask_url"]), orphan)
    assert vacuum(read_state(out, None), 0, False, out) >= 1
    assert not Path(big["mask_url"]).exists() and Path(again["mask_url"]).exists() and orphan.exists()
    vacuum(read_state(out, None), 0, True, out)
    assert not orphan.exists() and int((maskstore.read_mask(again["mask_url"]) == 0).sum()) == again["class_pixels"][0]


@pytest.mark.flow("nightly-large-image")
def test_nightly_huge_image_on_s3(ray_local, tmp_path, s3):
    """The same on S3 (moto on loopback): the actors write the store's chunks through the run's storage options, its
    objects are merged across regions, and once the row is replaced (another input size) the full vacuum leaves
    only the current run's store."""
    import s3fs

    from rayseg.nightly import nightly
    from rayseg.table import read_state, vacuum

    bucket, opts = s3
    fs = s3fs.S3FileSystem(**opts)
    img = tiled_picture(1024)
    write_pyramid(tmp_path / "slide.tif", img, levels=2, tile=128)
    fs.put_file(str(tmp_path / "slide.tif"), f"{bucket}/in/slide.tif")
    fs.pipe(f"{bucket}/in/a.png", png_bytes(ihc()[:100, :150]))
    out = f"{bucket}/out"
    kw = dict(inputs=(f"{bucket}/in",), output=out, model="unet", num_classes=2, tile=128, region_size=512, background="none",
              batch_size=4, quiet=True, storage_options=opts, objects=True)
    first = nightly(**kw)
    assert (first["rows"], first["errors"], first["large_images"], first["regions"]) == (2, 0, 1, 4)
    (big,) = [r for r in read_table(out, opts).to_table().to_pylist() if r["image_id"].endswith("slide.tif")]
    mask = maskstore.read_mask(big["mask_url"], opts)
    assert big["mask_url"].startswith(f"{out}/masks/{first['run_id']}/") and mask.shape == (1024, 1024)
    n, _, _, _ = cv2.connectedComponentsWithStats((mask == 1).astype(np.uint8), connectivity=8)
    assert len(big["objects"]) == n - 1 == big["num_components"][1]

    second = nightly(**{**kw, "input_size": 64})  # a keyed option: the rows are replaced, the store is new
    assert second["rows"] == 2 and not nightly(**{**kw, "input_size": 64})["rows"]
    vacuum(read_state(out, opts), 0, True, out, opts)
    assert fs.ls(f"{out}/masks") == [f"{out.removeprefix('s3://')}/masks/{second['run_id']}"]


def test_nightly_commits_a_huge_image_as_soon_as_its_last_region_is_written(ray_local, tmp_path):
    """Two huge images on one actor, waves closed each second: the small one's row is committed while the
    big one's regions are still being segmented, so a kill then would lose only the big one's work."""
    from rayseg.nightly import nightly
    from rayseg.table import read_state

    inputs = tmp_path / "in"
    inputs.mkdir()
    img = tiled_picture(2048)
    write_pyramid(inputs / "a_small.tif", np.ascontiguousarray(img[:512, :1024]), levels=2, tile=128)  # 2 regions
    write_pyramid(inputs / "b_big.tif", np.ascontiguousarray(img[:1024, :2048]), levels=2, tile=128)  # 8 regions
    out = str(tmp_path / "out")
    summary = nightly(inputs=(str(inputs),), output=out, model="unet", num_classes=2, tile=128, region_size=512,
                      background="none", actors="1:1", batch_size=4, commit_seconds=1, quiet=True)
    assert (summary["rows"], summary["errors"], summary["large_images"], summary["regions"]) == (2, 0, 2, 10)
    records = {url.rsplit("/", 1)[1]: r for url, r in read_state(out, None).records.items()}
    small_committed = pd.Timestamp(records["a_small.tif"]["committed_at"]).timestamp()
    big_regions = sorted(os.path.getmtime(p) for p in (tmp_path / "out" / "masks").glob("*/b_big-*.zarr/regions/*.json"))
    assert len(big_regions) == 8
    assert small_committed < big_regions[-1], "the small image waited for the big one's regions"
