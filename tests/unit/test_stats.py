import numpy as np
from pycocotools import mask as coco_mask

from rayseg.stats import SCHEMA, class_pixels, components, decode_png, decode_rle, encode_batch, encode_png


def sample_mask():
    m = np.zeros((20, 30), np.uint8)
    m[2:6, 2:6] = 1
    m[10:12, 20:25] = 1  # a second class-1 component
    m[15:19, 0:30] = 2
    return m


def test_png_round_trip_is_exact():
    m = sample_mask()
    back = decode_png(encode_png(m))
    assert back.dtype == np.uint8 and back.ndim == 2 and (back == m).all()


def test_counts_and_components():
    m = sample_mask()
    counts = class_pixels(m, 3)
    assert counts.sum() == m.size
    assert counts.tolist() == [m.size - 16 - 10 - 120, 26, 120]
    # the class-2 band spans the full width, cutting the background into two pieces
    assert components(m, 3, counts).tolist() == [2, 2, 1]


def test_diagonal_pixels_join_one_component():
    m = np.eye(5, dtype=np.uint8)
    assert components(m, 2, class_pixels(m, 2))[1] == 1


def batch_of(masks, errors):
    n = len(masks)
    return {
        "image_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "source": np.array(["s"] * n, dtype=object),
        "shard": np.array(["s"] * n, dtype=object),
        "model": np.array(["unet@x"] * n, dtype=object),
        "error": np.array(errors, dtype=object),
        "mask": _obj(masks),
        "mean_confidence": np.array([0.5] * n, np.float32),
    }


def _obj(items):
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def test_encode_batch_rle_decodes_with_pycocotools_to_the_png_mask():
    m = sample_mask()
    table = encode_batch(batch_of([m, np.zeros((1, 1), np.uint8)], [None, "bad file"]), num_classes=3, mask_format="both")
    assert table.schema == SCHEMA
    row, bad = table.to_pylist()
    png = decode_png(row["mask_png"])
    assert (png == m).all()
    assert (decode_rle(row["mask_rle"], row["height"], row["width"]) == m).all()
    for entry in row["mask_rle"]:  # each class on its own, straight through pycocotools
        got = coco_mask.decode({"size": entry["size"], "counts": entry["counts"].encode()})
        assert (got.astype(bool) == (m == entry["class"])).all()
    assert sum(row["class_pixels"]) == row["height"] * row["width"]
    assert bad["error"] == "bad file" and bad["mask_png"] is None and bad["height"] is None


def test_rle_only_leaves_png_null():
    table = encode_batch(batch_of([sample_mask()], [None]), num_classes=3, mask_format="rle")
    row = table.to_pylist()[0]
    assert row["mask_png"] is None and len(row["mask_rle"]) == 3
