"""The per-object table: one row per connected component of each foreground class, in OUT/objects/.

    rayseg segment shards/*.tar --output out/ --objects --min-area 20
    duckdb -c "SELECT DISTINCT image_id FROM read_parquet('out/objects/*.parquet') WHERE class = 2 AND area > 500"

Objects are extracted once, in the encode stage, from the mask and the per-pixel confidence map the predictor
keeps when --objects is on; they ride along in the image rows as an `objects` list column. After the images
are written, `explode` runs as a second, streaming Ray Data pass over OUT/images (reading only `image_id` and
`objects`) and writes the flat table. Components are 8-connected, as in the `num_components` column.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as coco_mask

RLE_STRUCT = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
OBJECT_STRUCT = pa.struct([
    ("class", pa.int32()),
    ("area", pa.int64()),
    ("bbox", pa.list_(pa.int32())),  # x, y, w, h (COCO order)
    ("centroid", pa.list_(pa.float64())),  # x, y
    ("mean_confidence", pa.float32()),
    ("rle", RLE_STRUCT),
    ("centroid_map", pa.list_(pa.float64())),  # x, y in the source's CRS: a huge GeoTIFF's objects; null otherwise
])
OBJECTS_TYPE = pa.list_(OBJECT_STRUCT)  # the column the image rows carry
OBJECTS_SCHEMA = pa.schema([("image_id", pa.string())] + [(f.name, f.type) for f in OBJECT_STRUCT])


def component_rle(labels: np.ndarray, k: int, bbox: tuple[int, int, int, int]) -> dict:
    """COCO RLE of the pixels labelled `k`, built from its bounding box only.

    Encoding a full-size binary mask per component would cost O(H*W) each, so an image with many objects
    would cost O(objects * H*W). Here the runs come from the component's own pixels, in COCO's column-major
    order, and pycocotools compresses them into its string form.
    """
    x, y, w, h = bbox
    height, width = labels.shape
    cols, rows = np.nonzero(labels[y : y + h, x : x + w].T == k)  # sorted by column, then row: column-major
    idx = (cols.astype(np.int64) + x) * height + rows + y
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([idx[:1], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], idx[-1:]]) + 1
    counts = np.empty(2 * len(starts) + 1, np.int64)
    counts[0] = starts[0]
    counts[1:-1:2] = ends - starts  # run of ones
    counts[2:-1:2] = starts[1:] - ends[:-1]  # gap of zeros before the next run
    counts[-1] = height * width - ends[-1]
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def extract(mask: np.ndarray, confidence: np.ndarray | None, num_classes: int, min_area: int = 0) -> list[dict]:
    """Objects of one mask: every 8-connected component of every class except 0 with at least `min_area` pixels."""
    out = []
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=num_classes)[1:num_classes]) + 1
    for c in present:
        n, labels, stats, centroids = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        if confidence is not None and confidence.shape == mask.shape:
            conf_sum = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=n)
        else:
            conf_sum = None
        for k in range(1, n):
            area = int(stats[k, cv2.CC_STAT_AREA])
            if area < max(min_area, 1):
                continue
            bbox = tuple(int(v) for v in stats[k, :4])  # left, top, width, height
            out.append({
                "class": int(c),
                "area": area,
                "bbox": list(bbox),
                "centroid": [float(centroids[k, 0]), float(centroids[k, 1])],
                "mean_confidence": float(conf_sum[k] / area / 255) if conf_sum is not None else None,
                "rle": component_rle(labels, k, bbox),
            })
    return out


def explode(table: pa.Table) -> pa.Table:
    """Ray Data stage (pyarrow batches): image rows [image_id, objects] -> one row per object."""
    lists = table["objects"].combine_chunks() if table.num_rows else pa.array([], OBJECTS_TYPE)
    if len(lists) == 0:
        return OBJECTS_SCHEMA.empty_table()
    parents = pc.list_parent_indices(lists)
    flat = pc.list_flatten(lists)
    cols = {"image_id": pc.take(table["image_id"], parents)}
    for f in OBJECT_STRUCT:
        cols[f.name] = pc.struct_field(flat, f.name)
    return pa.table(cols, schema=OBJECTS_SCHEMA)


def write_objects(images_path: str, objects_path: str, filesystem) -> None:
    """The second pass: OUT/images [image_id, objects] -> OUT/objects/*.parquet, streaming, on the cluster."""
    import ray

    ds = ray.data.read_parquet(images_path, filesystem=filesystem).select_columns(["image_id", "objects"])
    ds.map_batches(explode, batch_format="pyarrow", batch_size=None).write_parquet(objects_path, filesystem=filesystem)
    # Ray writes no file for empty blocks; with no object at all, leave one empty file so that
    # `read_parquet('OUT/objects/*.parquet')` in DuckDB finds the table (with no rows) instead of failing.
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    found = filesystem.get_file_info(pafs.FileSelector(objects_path, allow_not_found=True))
    if not any(i.type == pafs.FileType.File and i.path.endswith(".parquet") for i in found):
        filesystem.create_dir(objects_path, recursive=True)
        pq.write_table(OBJECTS_SCHEMA.empty_table(), f"{objects_path}/empty.parquet", filesystem=filesystem)
