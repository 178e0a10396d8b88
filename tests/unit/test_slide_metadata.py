"""Slides: --mpp picks the pyramid level closest to the microns per pixel a slide's metadata gives (Aperio's
description, OME-XML, a resolution in pixels per centimetre), an image without it is an error sentence, and
slide extensions are discovered as images."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from large_images import tiled_picture, write_pyramid, write_slide
from rayseg import regions, storage


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("svs") / "slide.svs", 2048)[0]  # levels 2048, 1024, 512 at 0.25 µm


@pytest.mark.parametrize("mpp, level", [(0.25, 0), (0.3, 0), (0.45, 1), (1.0, 2), (8.0, 2)])
def test_mpp_picks_the_closest_level_of_an_svs(svs, mpp, level):
    planned = regions.plan_image(svs, None, regions.RegionPlan(region_size=256, mpp=mpp))
    assert planned["error"] is None
    assert planned["level"] == level
    assert planned["shape"] == [2048 >> level] * 2


def test_mpp_from_ome_xml_and_from_a_centimetre_resolution(tmp_path):
    img = tiled_picture(1024)
    ome = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(ome, ome=True) as tw:
        tw.write(img, tile=(256, 256), subifds=1, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(img[::2, ::2], tile=(256, 256), subfiletype=1, photometric="rgb")
    plan = regions.RegionPlan(region_size=256, region_pixels=1, mpp=1.0)
    assert regions.plan_image(str(ome), None, plan)["level"] == 1
    cm = tmp_path / "slide.ndpi.tif"  # NDPI gives its resolution per centimetre: 0.5 µm is 20000 pixels per cm
    with tifffile.TiffWriter(cm) as tw:
        tw.write(img, tile=(256, 256), subifds=1, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
        tw.write(img[::2, ::2], tile=(256, 256), subfiletype=1, photometric="rgb")
    assert regions.plan_image(str(cm), None, plan)["level"] == 1
    assert regions.plan_image(str(cm), None, regions.RegionPlan(region_size=256, region_pixels=1, mpp=0.5))["level"] == 0


def test_mpp_on_an_image_without_it_is_an_error_sentence(tmp_path):
    path = write_pyramid(tmp_path / "plain.tif", np.full((1024, 1024, 3), 200, np.uint8), levels=2)
    planned = regions.plan_image(path, None, regions.RegionPlan(region_size=256, mpp=0.5))
    assert planned["regions"] == []
    assert planned["error"] == "--mpp 0.5 asked, but the image carries no microns per pixel (use --level)"


def test_slide_extensions_are_discovered_and_planned(tmp_path):
    for name in ("a.svs", "b.ndpi", "c.ome.tif", "d.png"):
        (tmp_path / name).write_bytes(b"x")
    shards, ignored = storage.discover([str(tmp_path)])
    assert sorted((s.url.rsplit("/", 1)[-1], s.kind) for s in shards) == [(n, "image") for n in ("a.svs", "b.ndpi", "c.ome.tif", "d.png")]
    assert not ignored
    assert all(regions.is_candidate(n) for n in ("a.svs", "B.NDPI", "c.ome.tif")) and not regions.is_candidate("d.png")


def test_a_vendor_slide_reads_by_region_through_tiffslide(svs):
    pytest.importorskip("tiffslide")
    from rayseg import slides

    f, source = regions.open_tiff(svs, None)
    with f, source:
        assert slides.is_slide(source), "an .svs goes through tiffslide where it is installed"
    region = regions.Region(svs, "unused", 1, (1024, 1024), (256, 512, 512, 768), (192, 576, 448, 832))
    with tifffile.TiffFile(svs) as tif:
        expected = tif.series[0].levels[1].asarray()[192:576, 448:832]
    assert np.array_equal(regions.read_window(region, None), expected)


def test_a_broken_svs_is_an_error_row_not_a_crash(tmp_path):
    from rayseg import decode, shards

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\xff" * 2_000_000)  # a TIFF's magic, then nothing readable; over the planning size
    with pytest.raises(Exception):
        regions.plan_image(str(bad), None, regions.RegionPlan())
    rows = list(shards.read_image_file(bad.as_uri(), {}))
    out = decode.decode_batch({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    assert list(out["error"]) == ["not a decodable image (unknown or corrupt format)"]
