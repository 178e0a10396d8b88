"""Dice on a real labelled image: the plan's defaults against a grid of hand options and a classical threshold.

    python tests/perf/quality_nuclei.py --set nuclei --workdir /tmp/quality --epochs 12 --json quality.json
    python tests/perf/quality_nuclei.py --set volume --workdir /tmp/quality-volume --epochs 12
    python tests/perf/quality_nuclei.py --set mni --workdir /tmp/quality-mni --epochs 30

Two real labelled sets ship in the stardist wheel (BSD-3-Clause), read from its files: `nuclei`, the 2-D 16-bit
fluorescence image of nuclei (test_image_nuclei_2d, from the 2018 Data Science Bowl, BBBC038) with its instance
labels, cut into training tiles of 64 x 64 and held-out images of 128 x 128 (twice the tiles' side, so the
inference geometry matters); and `volume`, its 3-D nuclei volume (test_image_nuclei_3d) sliced along z into 2-D
images, different slices for training and testing; and `mni`, 3 classes (other, grey and white matter) from the MNI
ICBM152 2009 T1 template and tissue maps in the nilearn wheel, sliced axially (mni_splits says how), scored by the
mean of the two tissues' Dice against two fitted thresholds. For `nuclei` and `volume` masks are foreground (any instance) against background. Each intensity
mode trains one UNet (`rayseg train`, 1 worker); each model is then scored on the held-out images by the predictor
with each geometry (native scale, or whole images resized to the input). The threshold baseline is the single
intensity threshold that maximises Dice on the training tiles (what a classical pipeline fits), applied as is.
Prints a Markdown table; the figures in docs/QUALITY.md come from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

TILE, HELD = 64, 128


def stardist_file(name: str) -> np.ndarray:
    import tifffile

    return tifffile.imread(os.path.join(importlib.util.find_spec("stardist").submodule_search_locations[0], "data", "images", name))


def write_pairs(root: str, split: str, pairs) -> None:
    """Folders of 16-bit TIFF pairs, masks 0/1."""
    import tifffile

    for side in ("images", "masks"):
        os.makedirs(os.path.join(root, split, side), exist_ok=True)
    for i, (image, truth) in enumerate(pairs):
        tifffile.imwrite(os.path.join(root, split, "images", f"{i:03d}.tif"), image)
        tifffile.imwrite(os.path.join(root, split, "masks", f"{i:03d}.tif"), truth.astype(np.uint8))


def nuclei_splits() -> dict[str, list]:
    """The 2-D image: rows 0-319 as 40 training tiles of 64, rows 320-383 as 8 validation tiles, rows 384-511 as 4
    held-out images of 128 x 128 (twice the tiles' side)."""
    image, truth = stardist_file("img2d.tif"), stardist_file("mask2d.tif") > 0
    cut = lambda r, c, s: (image[r : r + s, c : c + s], truth[r : r + s, c : c + s])  # noqa: E731
    return {"train": [cut(r, c, TILE) for r in range(0, 320, TILE) for c in range(0, 512, TILE)],
            "val": [cut(320, c, TILE) for c in range(0, 512, TILE)],
            "test": [cut(384, c, HELD) for c in range(0, 512, HELD)]}


def volume_splits() -> dict[str, list]:
    """The 3-D volume (31 x 61 x 57) sliced along z: slices 0-19 train, 20-24 validate, 25-30 are held out."""
    image, truth = stardist_file("img3d.tif"), stardist_file("mask3d.tif") > 0
    pairs = list(zip(image, truth))
    return {"train": pairs[:20], "val": pairs[20:25], "test": pairs[25:]}


def nilearn_volume(kind: str) -> np.ndarray:
    """One MNI ICBM152 2009 map (197 x 233 x 189, 1 mm, uint8) from the nilearn wheel's own files, averaged over 2 x 2 x
    2 blocks to 2 mm (so that a slice is ~98 x 116 and training fits a 2-core CPU)."""
    import nibabel

    base = os.path.join(importlib.util.find_spec("nilearn").submodule_search_locations[0], "datasets", "data")
    vol = np.asarray(nibabel.load(os.path.join(base, f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")).dataobj, np.float32)
    x, y, z = (d // 2 * 2 for d in vol.shape)
    return vol[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def mni_splits() -> dict[str, list]:
    """The T1 template as 16-bit axial slices (value x 16: 0..4080, a 12-bit scanner's range, zero outside the head)
    with 3 classes: 2 (white matter) where the WM probability is >= 0.5, else 1 (grey matter) where the GM
    probability is >= 0.5, else 0. The slices holding any tissue, from the bottom: 60% train, 15% validate, the
    top 25% are held out."""
    t1, gm, wm = (nilearn_volume(k) for k in ("t1", "gm", "wm"))
    image = np.round(t1 * 16).astype(np.uint16)
    labels = np.where(wm >= 127.5, 2, np.where(gm >= 127.5, 1, 0)).astype(np.uint8)
    pairs = [(image[:, :, z], labels[:, :, z]) for z in range(image.shape[2]) if labels[:, :, z].any()]
    a, b = int(len(pairs) * 0.6), int(len(pairs) * 0.75)
    return {"train": pairs[:a], "val": pairs[a:b], "test": pairs[b:]}


SETS = {"nuclei": nuclei_splits, "volume": volume_splits, "mni": mni_splits}
CLASSES = {"mni": (1, 2)}  # the classes whose Dice is averaged; the other sets' foreground is class 1


def write_splits(root: str, name: str) -> dict[str, list]:
    splits = SETS[name]()
    for split, pairs in splits.items():
        write_pairs(root, split, pairs)
    return {"held": splits["test"], "train": splits["train"]}


def dice(preds, truths) -> float:
    inter = sum(int((p & t).sum()) for p, t in zip(preds, truths))
    return 2 * inter / max(1, sum(int(p.sum() + t.sum()) for p, t in zip(preds, truths)))


def mean_dice(preds, truths, classes) -> float:
    """The mean over `classes` of each class's Dice, over all held-out pixels together."""
    return float(np.mean([dice([p == c for p in preds], [t == c for t in truths]) for c in classes]))


def two_thresholds(train, held) -> tuple[str, float]:
    """3 classes by two thresholds (0 below lo, 1 from lo to hi, 2 from hi: T1's background, grey, white), the pair
    that maximises the mean class-1/2 Dice on the training slices, from per-class histograms."""
    images, truths = np.concatenate([im.ravel() for im, _ in train]), np.concatenate([m.ravel() for _, m in train])
    edges = np.unique(np.quantile(images[images > 0], np.linspace(0, 1, 257)))
    hist = [np.histogram(images[truths == c], np.r_[edges, np.inf])[0] for c in (1, 2)]
    below = [np.r_[0, np.cumsum(h)] for h in hist]  # pixels of class c under edges[i] (index i)
    total, allbelow = [h.sum() for h in hist], np.r_[0, np.cumsum(np.histogram(images, np.r_[edges, np.inf])[0])]
    allbelow[1:] += int((images < edges[0]).sum())
    i, j = np.triu_indices(len(edges) + 1)  # lo = edges[i], hi = edges[j]
    gm_in = below[0][j] - below[0][i]
    wm_in = total[1] - below[1][j]
    n_all = len(images)
    d1 = 2 * gm_in / np.maximum(1, (allbelow[j] - allbelow[i]) + total[0])
    d2 = 2 * wm_in / np.maximum(1, (n_all - allbelow[j]) + total[1])
    k = int(np.argmax(d1 + d2))
    lo, hi = (float(edges[min(x, len(edges) - 1)]) for x in (i[k], j[k]))
    classify = lambda im: np.where(im >= hi, 2, np.where(im >= lo, 1, 0))  # noqa: E731
    return f"thresholds {lo:g} and {hi:g}", mean_dice([classify(im) for im, _ in held], [m for _, m in held], (1, 2))


def threshold_baseline(train, held) -> tuple[float, float]:
    """(the threshold fitted on the training tiles, Dice on the held-out images)."""
    values = np.unique(np.concatenate([im.ravel() for im, _ in train]))
    best = max(values, key=lambda t: dice([im > t for im, _ in train], [m for _, m in train]))
    return float(best), dice([im > best for im, _ in held], [m for _, m in held])


def predict(checkpoint: str, images, geometry: str) -> list[np.ndarray]:
    from rayseg.config import PredictConfig
    from rayseg.decode import ragged_column
    from rayseg.models import load_bundle
    from rayseg.predict import Predictor

    predictor = Predictor(load_bundle(checkpoint), PredictConfig(device="cpu", batch_size=8, geometry=geometry), threads=1)
    imgs = [im[..., None] for im in images]
    n = len(imgs)
    out = predictor({"image_id": np.arange(n).astype(str).astype(object), "image": ragged_column(imgs),
                     "dtype": np.array([imgs[0].dtype.name] * n, dtype=object), "error": np.full(n, None, dtype=object)})
    return list(out["mask"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", choices=sorted(SETS), default="nuclei")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="train's --seed (initialisation, augmentation)")
    p.add_argument("--modes", nargs="+", default=["", "dataset", "nonzero", "fixed:0:235"],
                   help="intensity modes to train ('' = the plan's)")
    p.add_argument("--json")
    args = p.parse_args()
    from rayseg.train import train

    data = write_splits(args.workdir, args.set)
    classes = CLASSES.get(args.set, (1,))
    if len(classes) > 1:
        fitted, base = two_thresholds(data["train"], data["held"])
    else:
        threshold, base = threshold_baseline(data["train"], data["held"])
        fitted = f"threshold > {threshold:g}"
    images, truths = [im for im, _ in data["held"]], [m for _, m in data["held"]]
    rows = [{"run": f"{fitted} (fitted on the training part)", "dice": {"-": round(base, 4)}}]
    print(json.dumps(rows[-1]), flush=True)
    for mode in args.modes:
        out = os.path.join(args.workdir, "run-" + (mode.replace(":", "_") or "plan"))
        t0 = time.time()
        summary = train(data=(os.path.join(args.workdir, "train"),), val_data=(os.path.join(args.workdir, "val"),), output=out,
                        model="unet", num_classes=len(classes) + 1, epochs=args.epochs, lr=3e-3, workers=1, seed=args.seed, intensity=mode, quiet=True,
                        address="local")
        best = os.path.join(out, "best")
        plan = {k: v["value"] for k, v in summary["plan"].items()}
        scores = {g: round(mean_dice(predict(best, images, g), truths, classes), 4) for g in ("native", "resize")}
        rows.append({"run": f"--intensity {mode}" if mode else "plan defaults", "plan": plan, "dice": scores,
                     "train_s": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print("| run | native scale | whole image resized |\n|---|---|---|")
    for r in rows:
        d = r["dice"]
        print(f"| {r['run']} | {d.get('native', d.get('-'))} | {d.get('resize', d.get('-'))} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
