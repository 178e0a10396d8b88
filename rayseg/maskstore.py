"""The mask store of a huge image: OME-Zarr (0.5, Zarr v3) labels written chunk by chunk by the actors.

    OUT/masks/NAME.zarr/                 group: {"ome": {"version": "0.5"}, "rayseg": the image's plan}
        labels/                          {"ome": {"labels": ["mask"]}}
            mask/                        multiscales (y, x) + image-label
                0/ 1/ ...                uint8 class indices, level k = level 0 taken every 2**k pixels (nearest: labels)
        regions/Y-X.json                 one record per region written: its class pixels, confidence sum, error

Planning creates the arrays (metadata only). A region's core is whole chunks at every level, so each chunk has
exactly one writer, and an all-background chunk is not stored at all (Zarr's fill value). Once every region is
written, `image_row` sums the records into the image's one output row and counts connected components over
the whole mask, band by band, joining labels across band borders (corners included), so the count equals
OpenCV's on the whole mask without holding it.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath

import numpy as np

from rayseg import storage

MASK = "labels/mask"
REGIONS = "regions"
MIN_CORE = 64  # the smallest core side a pyramid level goes down to: below it the level would be mostly chunk edges
MAX_CHUNK = 512  # chunk side at level 0: 256 KiB of uint8, a viewer's usual tile


def store_url(output: str, image_id: str, run_id: str = "") -> str:
    """OUT/masks/STEM-HASH.zarr: readable, and distinct for images of one name in different folders. A nightly run
    writes under OUT/masks/RUN_ID/, so a committed row's store never changes under its readers."""
    stem = posixpath.basename(image_id.rstrip("/")).split(".")[0][:64] or "image"
    return storage.join(output, "masks", *([run_id] if run_id else []), f"{stem}-{hashlib.sha256(image_id.encode()).hexdigest()[:12]}.zarr")


def zarr_store(url: str, storage_options: dict | None):
    """A Zarr store on any fsspec URL (a local folder directly)."""
    from zarr.storage import FsspecStore, LocalStore

    if "://" not in url or url.startswith("file://"):
        return LocalStore(url.removeprefix("file://"))
    return FsspecStore.from_url(url, storage_options=storage_options or {})


def levels(shape: tuple[int, int], region_size: int) -> list[tuple[tuple[int, int], int]]:
    """[(level shape, chunk side)]: level k halves k times while a core stays whole chunks of at least MIN_CORE."""
    out, k = [], 0
    while k == 0 or (region_size % 2**k == 0 and region_size >> k >= MIN_CORE and max(shape) >> k >= MIN_CORE):
        out.append(((math.ceil(shape[0] / 2**k), math.ceil(shape[1] / 2**k)), math.gcd(MAX_CHUNK, region_size >> k)))
        k += 1
    return out


def create(url: str, storage_options: dict | None, shape: tuple[int, int], region_size: int, attrs: dict) -> None:
    """The empty store: groups, OME metadata and arrays, no chunk. Rewrites any store already there."""
    import zarr

    ome = {"version": "0.5"}
    pyramid = levels(shape, region_size)
    root = zarr.open_group(zarr_store(url, storage_options), mode="w", zarr_format=3, attributes={"ome": ome, "rayseg": attrs})
    root.create_group("labels", attributes={"ome": {**ome, "labels": ["mask"]}})
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [2.0**k, 2.0**k]}]} for k in range(len(pyramid))]
    mask = root.create_group(MASK, attributes={"ome": {**ome, "multiscales": [{
        "name": "mask", "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}], "datasets": datasets}],
        "image-label": {"version": "0.5", "source": {"image": "../../"}}}})
    for k, (lshape, chunk) in enumerate(pyramid):
        mask.create_array(str(k), shape=lshape, chunks=(chunk, chunk), dtype="uint8", fill_value=0, dimension_names=["y", "x"])


def write_region(url: str, storage_options: dict | None, core: tuple[int, int, int, int], mask: np.ndarray, record: dict) -> None:
    """One region's mask core into every level (all-zero chunks are not stored), then its record."""
    import zarr

    store = zarr_store(url, storage_options)
    y0, _, x0, _ = core
    group = zarr.open_group(store, path=MASK, mode="r")
    k = 0
    while str(k) in group:  # the levels planning created
        arr = zarr.open_array(store, path=f"{MASK}/{k}", mode="r+")
        part = mask[:: 2**k, :: 2**k]
        arr[y0 >> k : (y0 >> k) + part.shape[0], x0 >> k : (x0 >> k) + part.shape[1]] = part
        k += 1
    write_record(url, storage_options, core, record)


def write_record(url: str, storage_options: dict | None, core: tuple[int, int, int, int], record: dict) -> None:
    """A region's record, written after its chunks: its presence means the region is done."""
    fs, path = storage.filesystem(url, storage_options)
    fs.makedirs(posixpath.join(path, REGIONS), exist_ok=True)
    with fs.open(posixpath.join(path, REGIONS, f"{core[0]}-{core[2]}.json"), "w") as f:
        json.dump(record, f, sort_keys=True)


def read_mask(url: str, storage_options: dict | None = None, level: int = 0) -> np.ndarray:
    """A whole level of the mask (for tests and thumbnails: it is the full array in memory)."""
    import zarr

    return zarr.open_array(zarr_store(url, storage_options), path=f"{MASK}/{level}", mode="r")[...]


def attributes(url: str, storage_options: dict | None) -> dict:
    """The image's plan, as planning wrote it into the store's root group."""
    import zarr

    return dict(zarr.open_group(zarr_store(url, storage_options), mode="r").attrs["rayseg"])


def thumbnail(url: str, storage_options: dict | None, side: int) -> np.ndarray:
    """The coarsest pyramid level at least `side` long (or level 0), whole: what a report overlays."""
    import zarr

    group = zarr.open_group(zarr_store(url, storage_options), path=MASK, mode="r")
    k = 0
    while str(k + 1) in group and max(group[str(k + 1)].shape) >= side:
        k += 1
    return group[str(k)][...]


def records(url: str, storage_options: dict | None) -> list[dict]:
    fs, path = storage.filesystem(url, storage_options)
    try:
        names = sorted(fs.ls(posixpath.join(path, REGIONS), detail=False))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        with fs.open(name, "r") as f:
            out.append(json.load(f))
    return out


class _Joins:
    """Union-find over component ids, grown as bands add new ones."""

    def __init__(self):
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        first = len(self.parent)
        self.parent.extend(range(first, first + n))
        return first

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def count(self) -> int:
        return sum(1 for i in range(len(self.parent)) if self.find(i) == i)


def components(url: str, storage_options: dict | None, classes: list[int], band: int = MAX_CHUNK) -> dict[int, dict]:
    """{class: {"count", "area", "bbox", "centroid"}}: the 8-connected components of the whole level-0 mask, read
    `band` rows at a time. Each band is labelled by OpenCV; the labels of a band's first row join those of the row
    above at x-1, x and x+1 (union-find), and each component's area, box and centroid are the sums over its parts,
    in level-0 pixels: what cv2.connectedComponentsWithStats gives on the whole mask, without holding it."""
    import cv2
    import zarr

    arr = zarr.open_array(zarr_store(url, storage_options), path=f"{MASK}/0", mode="r")
    h, _ = arr.shape
    joins = {c: _Joins() for c in classes}
    parts: dict[int, list[np.ndarray]] = {c: [] for c in classes}  # per part: area, x0, y0, x1, y1, sum x, sum y
    above: dict[int, np.ndarray] = {}
    for y in range(0, h, band):
        rows = arr[y : min(y + band, h)]
        for c in classes:
            n, labels, stats, centroids = cv2.connectedComponentsWithStats((rows == c).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            first = joins[c].add(n - 1)
            st, area = stats[1:].astype(np.float64), stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
            parts[c].append(np.stack([area, st[:, 0], st[:, 1] + y, st[:, 0] + st[:, 2], st[:, 1] + y + st[:, 3],
                                      centroids[1:, 0] * area, (centroids[1:, 1] + y) * area], axis=1))
            ids = np.where(labels > 0, labels - 1 + first, -1)
            if c in above:
                prev, top = above[c], ids[0]
                for shift in (-1, 0, 1):  # corners included: (x, y-1) touches (x-1, y), (x, y) and (x+1, y)
                    a = prev[max(0, shift) : len(prev) + min(0, shift)]
                    b = top[max(0, -shift) : len(top) + min(0, -shift)]
                    both = (a >= 0) & (b >= 0)
                    for i, j in set(zip(a[both].tolist(), b[both].tolist())):
                        joins[c].union(i, j)
            above[c] = ids[-1]
    out = {}
    for c in classes:
        p = np.concatenate(parts[c]) if parts[c] else np.zeros((0, 7))
        roots = np.array([joins[c].find(i) for i in range(len(p))], np.int64)
        uniq, inv = np.unique(roots, return_inverse=True)
        agg = np.zeros((len(uniq), 7))
        agg[:, 1:3], agg[:, 3:5] = np.inf, -np.inf
        for col, fn in ((0, np.add), (5, np.add), (6, np.add), (1, np.minimum), (2, np.minimum), (3, np.maximum), (4, np.maximum)):
            fn.at(agg[:, col], inv, p[:, col])
        out[c] = {"count": len(uniq), "area": agg[:, 0].astype(np.int64),
                  "bbox": np.stack([agg[:, 1], agg[:, 2], agg[:, 3] - agg[:, 1], agg[:, 4] - agg[:, 2]], axis=1).astype(np.int64),
                  "centroid": agg[:, 5:7] / np.maximum(agg[:, :1], 1)}
    return out


def objects_of(found: dict[int, dict], min_area: int, scale: tuple[float, float] = (1.0, 1.0), to_map=None) -> list[dict]:
    """The objects table rows of a huge image (rayseg.objects' fields; no per-object RLE or confidence yet), in
    level-0 pixels of the source: the mask's pixels times `scale` (x, y: level 0's size over the level segmented's),
    so at --level 0 exactly the mask's. `min_area` is in the mask's pixels. `to_map(x, y)`, given, maps continuous
    level-0 pixel coordinates (corner at 0, 0) to the source's CRS: each object's `centroid_map`."""
    sx, sy = scale
    out = []
    for c, comp in sorted(found.items()):
        if c == 0:
            continue
        for k in np.argsort(comp["bbox"][:, 1] * (1 << 32) + comp["bbox"][:, 0], kind="stable"):  # top to bottom
            if comp["area"][k] >= max(min_area, 1):
                x, y, w, h = (int(v) for v in comp["bbox"][k])
                cx, cy = (float(v) for v in comp["centroid"][k])  # pixel indices: a pixel's centre is at i + 0.5
                obj = {"class": int(c), "area": int(round(int(comp["area"][k]) * sx * sy)),
                       "bbox": [int(round(x * sx)), int(round(y * sy)), int(round(w * sx)), int(round(h * sy))],
                       "centroid": [(cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], "mean_confidence": None, "rle": None}
                if to_map is not None:
                    obj["centroid_map"] = [float(v) for v in to_map((cx + 0.5) * sx, (cy + 0.5) * sy)]
                out.append(obj)
    return out


def image_row(url: str, storage_options: dict | None, objects: bool = False, min_area: int = 0, to_map=None) -> dict:
    """The image's output row fields from its store: class pixels (skipped regions are background), mean
    confidence over the pixels segmented, components over the whole mask (and with `objects`, each of them, in
    level-0 pixels, with map coordinates where `to_map` is given: objects_of), regions skipped, the first error."""
    attrs = attributes(url, storage_options)
    recs = records(url, storage_options)
    k = attrs["num_classes"]
    h, w = attrs["shape"]
    row = {"image_id": attrs["image_id"], "source": attrs["image_id"], "shard": attrs["image_id"], "height": h, "width": w,
           "mask_url": url, "regions_skipped": attrs["skipped"], "error": attrs.get("error")}
    errors = [r["error"] for r in recs if r.get("error")]
    if row["error"] is None and errors:
        row["error"] = f"{len(errors)} region(s) failed, the first: {errors[0]}"
    if row["error"] is None and len(recs) != attrs["regions"]:
        row["error"] = f"{attrs['regions'] - len(recs)} of {attrs['regions']} regions were not written"
    if row["error"] is not None:
        return row
    pixels = np.zeros(k, np.int64)
    for r in recs:
        pixels += np.array(r["class_pixels"], np.int64)
    pixels[0] += h * w - int(pixels.sum())  # skipped regions hold background
    segmented = sum(r["pixels"] for r in recs)
    found = components(url, storage_options, [c for c in range(k) if pixels[c]])
    if objects:
        h0, w0 = attrs.get("levels", [[h, w]])[0]
        row["objects"] = objects_of(found, min_area, (w0 / w, h0 / h), to_map)
    row.update(class_pixels=pixels.tolist(), num_components=[found[c]["count"] if c in found else 0 for c in range(k)],
               mean_confidence=sum(r["confidence_sum"] for r in recs) / segmented if segmented else float("nan"))
    return row
