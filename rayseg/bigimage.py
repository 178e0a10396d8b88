"""Huge images through `rayseg segment`: plan their regions, segment regions in the actor pool, then one row each.

    plan (Ray tasks, headers and overviews only) -> region rows, mixed with the ordinary rows into the pool
    -> each region: read its window, normalise it image-wide, segment its core on the global tile grid, write
       its chunks and its record into the image's mask store (rayseg.maskstore)
    -> once all are written: one output row per image, from its store (image_rows)

A region row travels as an ordinary read row (`format` "region", `data` the region's JSON), so one actor pool
takes both kinds and no stage needs a second schema. The image's row carries the URL of its store instead of a
PNG, and how many regions were skipped as background.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pyarrow as pa

from rayseg import maskstore, regions, storage
from rayseg.shards import error_reason
from rayseg.stats import REGION_FIELDS

log = logging.getLogger("rayseg")

PLAN_FILES = 8  # files whose headers one planning task reads: a header is a few ranged reads, an overview a few MB
MIN_PLAN_BYTES = 1 << 20  # smaller TIFFs are not planned: no image worth regions fits in 1 MiB, and many small files skip a pass


REGION_ONLY = ("mpp", "level", "ome_tiff", "cog")  # options only an image read by region honours


def region_options(cfg) -> list[str]:
    """The flags of REGION_ONLY given away from their declared defaults (config.OPTIONS)."""
    from rayseg.config import OPTIONS

    return [f"--{name.replace('_', '-')}" for name in REGION_ONLY if getattr(cfg, name) != OPTIONS[name].default]


def plan_files(urls: list[str], storage_options: dict, plan: regions.RegionPlan, intensity: str, output: str,
               num_classes: int, run_id: str = "") -> list[dict | None]:
    """For each file: None (the ordinary path), or {"image_id", "store", "regions": region row dicts}. The
    image's store is created here, empty, so the actors only write chunks into it."""
    out = []
    for url in urls:
        try:
            planned = regions.plan_image(url, storage_options, plan, intensity)
        except Exception as e:  # noqa: BLE001 - not a TIFF tifffile can plan: the ordinary path reads it and says why
            log.debug("planning %s by region failed (%s); it takes the ordinary path", url, e)
            planned = None
        if planned is None:
            out.append(None)
            continue
        store = maskstore.store_url(output, url, run_id)
        shape = tuple(planned.get("shape") or planned["head"]["levels"][0])
        attrs = {"image_id": url, "level": planned["level"], "shape": list(shape), "levels": planned["head"]["levels"],
                 "num_classes": num_classes, "region_size": plan.region_size, "regions": len(planned["regions"]),
                 "skipped": planned["skipped"], "error": planned["error"], "intensity_window": planned["window"],
                 "geo": planned["head"]["geo"]}
        maskstore.create(store, storage_options, shape, plan.region_size, attrs)
        window = None if planned["window"] is None else tuple(tuple(v) for v in planned["window"])
        rows = [] if planned["error"] else [
            {"image_id": url, "source": url, "shard": url, "format": "region", "error": None,
             "data": regions.Region(url, store, planned["level"], shape, tuple(r["core"]), tuple(r["window"]), window).to_bytes()}
            for r in planned["regions"]]
        out.append({"image_id": url, "store": store, "regions": rows})
    return out


def plan(shards, cfg, card, run_id: str = "") -> tuple[list, list[dict], list[dict]]:
    """(the shards left to the ordinary path, the huge images [{image_id, store}], their region rows).

    Runs the planning in Ray tasks, PLAN_FILES files each; only tiled or pyramidal TIFFs over the threshold, or
    pyramids, leave the ordinary path. `card` (the model's) says the classes and the normalisation to measure for."""
    import ray

    from rayseg.intensity import effective

    asked = region_options(cfg)
    least = 0 if asked else MIN_PLAN_BYTES  # a small pyramid is planned too when its level or export is asked for
    candidates = [s for s in shards if s.kind == "image" and regions.is_candidate(s.url) and s.size >= least]
    if not candidates:
        _say_whole(shards, asked)
        return shards, [], []
    if importlib.util.find_spec("zarr") is None:  # tifffile's region reads and the mask store both need it
        log.warning("huge TIFFs are decoded whole (up to --max-pixels): reading them by region needs rayseg[wsi] (zarr)")
        return shards, [], []
    rp = region_plan(cfg)
    task = ray.remote(num_cpus=1)(plan_files)
    groups = [candidates[i : i + PLAN_FILES] for i in range(0, len(candidates), PLAN_FILES)]
    so = cfg.storage_options
    spec = effective(card.intensity, cfg.intensity)
    results = ray.get([task.remote([s.url for s in g], so, rp, spec, cfg.output, card.num_classes, run_id) for g in groups])
    large, rows = [], []
    for group, planned in zip(groups, results):
        for shard, p in zip(group, planned):
            if p is not None:
                large.append({"image_id": shard.url, "store": p["store"]})
                rows += p["regions"]
    taken = {x["image_id"] for x in large}
    if large:
        log.info("%d huge image(s) go by region: %d regions to segment", len(large), len(rows))
    left = [s for s in shards if s.url not in taken]
    _say_whole(left, asked)
    return left, large, rows


def _say_whole(shards, asked: list[str]) -> None:
    """One warning where region-only options were asked for but some inputs are segmented whole, without them."""
    if asked and shards:
        log.warning("%s appl%s only to tiled or pyramidal TIFFs and slides, read by region: %d input(s) are segmented "
                    "whole at their own resolution without it, e.g. %s", " and ".join(asked), "ies" if len(asked) == 1 else "y",
                    len(shards), shards[0].url)


def region_plan(cfg) -> regions.RegionPlan:
    from rayseg.models import DEFAULT_INPUT_SIZE

    return regions.RegionPlan(region_pixels=cfg.region_pixels, region_size=cfg.region_size, level=cfg.level, mpp=cfg.mpp,
                              max_regions=cfg.max_regions, background=cfg.background,
                              tile=cfg.tile or cfg.input_size or DEFAULT_INPUT_SIZE, overlap=cfg.overlap)


def segment_region(predictor, region: regions.Region, storage_options: dict, num_classes: int) -> None:
    """Read, normalise, segment and write one region; a failure is written as the region's record, so the
    image's row says what went wrong."""
    record: dict = {"core": list(region.core), "error": None}
    try:
        img = predictor.inputs.one(regions.read_window(region, storage_options), None, region.intensity_window)
        mask, conf_sum = predictor.core(img, (region.window[0], region.window[2]), region.shape, region.core)
        record.update(class_pixels=np.bincount(mask.ravel(), minlength=num_classes)[:num_classes].tolist(),
                      confidence_sum=conf_sum, pixels=int(mask.size))
    except Exception as e:  # noqa: BLE001 - this region's error; the image's row carries it
        log.warning("region %s of %s failed: %s", region.key, region.url, error_reason(e))
        record["error"] = f"region at y={region.core[0]}, x={region.core[2]}: {error_reason(e)}"
        storage.retry(maskstore.write_record, region.store, storage_options, region.core, record, what="writing a region's record")
        return
    storage.retry(maskstore.write_region, region.store, storage_options, region.core, mask, record, what="writing a region")


def region_rows(batch: dict[str, np.ndarray]) -> list[int]:
    return [i for i, f in enumerate(batch.get("format", ())) if f == "region"]


def with_region_columns(table: pa.Table) -> pa.Table:
    """The two columns of a run with huge images, null on the ordinary rows."""
    for name, typ in REGION_FIELDS:
        table = table.append_column(pa.field(name, typ), pa.nulls(table.num_rows, typ))
    return table


def map_transform(source: str, storage_options: dict):
    """For a GeoTIFF: a function (x, y) in continuous level-0 pixels -> (x, y) in the source's CRS (its geotransform,
    read with rasterio); None without rasterio (rayseg[geo]), which is said once. Raises if the file cannot be read."""
    if importlib.util.find_spec("rasterio") is None:
        if not getattr(map_transform, "said", False):
            log.warning("objects of GeoTIFFs get no map coordinates (centroid_map) without rasterio: pip install 'rayseg[geo]'")
            map_transform.said = True
        return None
    from rayseg.geo import source_georeference

    _, transform, _ = source_georeference(source, storage_options)
    return lambda x, y: transform @ (x, y)


def image_rows(batch: dict[str, np.ndarray], storage_options: dict, model: str, objects: bool, min_area: int = 0,
               cog: bool = False, ome_tiff: bool = False) -> pa.Table:
    """Ray Data stage: huge images' stores -> their output rows (stats.SCHEMA, the region columns, and with
    --objects the image's objects, merged across region borders, in level-0 pixels, a GeoTIFF's with map
    coordinates). With `cog`, a GeoTIFF's mask is also written as a COG beside its store (rayseg.geo); with
    `ome_tiff`, every mask as a pyramidal OME-TIFF (rayseg.ometiff). A georeference or an export that fails is
    the row's error."""
    from rayseg.stats import SCHEMA

    rows = []
    for store, image_id in zip(map(str, batch["store"]), map(str, batch["image_id"])):
        geo = bool(maskstore.attributes(store, storage_options).get("geo"))
        to_map, geo_error = None, None
        if objects and geo:
            try:
                to_map = map_transform(image_id, storage_options)
            except Exception as e:  # noqa: BLE001 - the mask is in its store; its objects cannot be placed on the map
                geo_error = f"the georeference could not be read for the objects' map coordinates ({error_reason(e)})"
        r = maskstore.image_row(store, storage_options, objects, min_area, to_map)
        r["model"] = model
        r["error"] = r["error"] or geo_error
        if r["error"] is None:
            r["error"] = _exports(store, image_id, storage_options, cog and geo, ome_tiff)
        rows.append(r)
    cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    table = pa.table(cols, schema=SCHEMA)
    if objects:
        from rayseg.objects import OBJECTS_TYPE

        table = table.append_column("objects", pa.array([r.get("objects") for r in rows], OBJECTS_TYPE))
    for name, typ in REGION_FIELDS:
        table = table.append_column(pa.field(name, typ), pa.array([r.get(name) for r in rows], typ))
    return table


def _exports(store: str, image_id: str, storage_options: dict, cog: bool, ome_tiff: bool) -> str | None:
    """Writes the asked-for exports of a store beside it: a COG (a GeoTIFF's), a pyramidal OME-TIFF. Returns the
    first failure as the row's error, or None."""
    if cog:
        from rayseg.geo import write_cog

        try:
            write_cog(store, image_id, storage_options)
        except Exception as e:  # noqa: BLE001 - the mask is in its store; the export's failure is this row's error
            return f"the COG export failed ({error_reason(e)})"
    if ome_tiff:
        from rayseg.ometiff import write_ome_tiff

        try:
            write_ome_tiff(store, storage_options)
        except Exception as e:  # noqa: BLE001 - as the COG: the mask is in its store, the export's failure is the row's error
            return f"the OME-TIFF export failed ({error_reason(e)})"
    return None
