"""Masks -> output rows: PNG and COCO RLE encodings, per-class pixel counts and connected components.

The output schema is fixed here, once, so every run writes the same columns and types and a folder of runs
reads as one table in pandas, DuckDB or Spark.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
from pycocotools import mask as coco_mask

from rayseg.decode import errors_of

RLE_TYPE = pa.list_(pa.struct([("class", pa.int32()), ("size", pa.list_(pa.int32())), ("counts", pa.string())]))

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("source", pa.string()),
    ("shard", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("mask_png", pa.binary()),
    ("mask_rle", RLE_TYPE),
    ("class_pixels", pa.list_(pa.int64())),
    ("num_components", pa.list_(pa.int32())),
    ("mean_confidence", pa.float32()),
    ("model", pa.string()),
    ("error", pa.string()),
])
# The two columns a huge image's row fills (rayseg.bigimage): its mask store's URL in place of the PNG, and how many
# of its regions were skipped as background. A segment output has them when its run had a huge image; a nightly
# table always has them (null on ordinary rows).
REGION_FIELDS = (("mask_url", pa.string()), ("regions_skipped", pa.int32()))


def encode_png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # level 1: masks are flat, more effort gains little
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def encode_rle(mask: np.ndarray, classes: np.ndarray) -> list[dict]:
    """One COCO RLE per class present, counts in COCO's compressed string form."""
    out = []
    for c in classes:
        rle = coco_mask.encode(np.asfortranarray((mask == c).astype(np.uint8)))
        out.append({"class": int(c), "size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return out


def decode_rle(entries: list[dict], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    for e in entries:
        m = coco_mask.decode({"size": list(e["size"]), "counts": e["counts"].encode("ascii")})
        mask[m.astype(bool)] = e["class"]
    return mask


def class_pixels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(mask.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)


def components(mask: np.ndarray, num_classes: int, counts: np.ndarray) -> np.ndarray:
    """8-connected components per class (0 for classes absent from the mask)."""
    out = np.zeros(num_classes, np.int32)
    for c in np.flatnonzero(counts):
        n, _ = cv2.connectedComponents((mask == c).astype(np.uint8), connectivity=8)
        out[c] = n - 1
    return out


def encode_batch(batch: dict[str, np.ndarray], num_classes: int, mask_format: str = "png", objects: bool = False, min_area: int = 0) -> pa.Table:
    """Ray Data stage: the last one before the writer. Error rows keep their error and get null mask columns.

    With `objects`, each row also carries its connected components (rayseg.objects), for OUT/objects/.
    """
    n = len(batch["image_id"])
    cols: dict[str, list] = {name: [None] * n for name in SCHEMA.names}
    for name in ("image_id", "source", "shard", "model"):
        cols[name] = [str(v) for v in batch[name]]
    cols["error"] = errors = errors_of(batch)
    for i in range(n):
        if errors[i] is not None:
            continue
        mask = batch["mask"][i]
        counts = class_pixels(mask, num_classes)
        cols["height"][i], cols["width"][i] = int(mask.shape[0]), int(mask.shape[1])
        if mask_format in ("png", "both"):
            cols["mask_png"][i] = encode_png(mask)
        if mask_format in ("rle", "both"):
            cols["mask_rle"][i] = encode_rle(mask, np.flatnonzero(counts))
        cols["class_pixels"][i] = counts.tolist()
        cols["num_components"][i] = components(mask, num_classes, counts).tolist()
        cols["mean_confidence"][i] = float(batch["mean_confidence"][i])
    table = pa.table(cols, schema=SCHEMA)
    if objects:
        from rayseg.objects import OBJECTS_TYPE, extract

        conf = batch.get("confidence")
        objs = [None if errors[i] is not None else extract(batch["mask"][i], None if conf is None else conf[i], num_classes, min_area) for i in range(n)]
        table = table.append_column("objects", pa.array(objs, OBJECTS_TYPE))
    return table
