"""Dice on a real labelled image: the plan's defaults against a grid of hand options and a classical threshold.

    python tests/perf/quality_nuclei.py --set nuclei --workdir /tmp/quality --epochs 12 --json quality.json
    python tests/perf/quality_nuclei.py --set volume --workdir /tmp/quality-volume --epochs 12

Two real labelled sets ship in the stardist wheel (BSD-3-Clause), read from its files: `nuclei`, the 2-D 16-bit
fluorescence image of nuclei (test_image_nuclei_2d, from the 2018 Data Science Bowl, BBBC038) with its instance
labels, cut into training tiles of 64 x 64 and held-out images of 128 x 128 (twice the tiles' side, so the
inference geometry matters); and `volume`, its 3-D nuclei volume (test_image_nuclei_3d) sliced along z into 2-D
images, different slices for training and testing. Masks are foreground (any instance) against background. Each intensity
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


SETS = {"nuclei": nuclei_splits, "volume": volume_splits}


def write_splits(root: str, name: str) -> dict[str, list]:
    splits = SETS[name]()
    for split, pairs in splits.items():
        write_pairs(root, split, pairs)
    return {"held": splits["test"], "train": splits["train"]}


def dice(preds, truths) -> float:
    inter = sum(int((p & t).sum()) for p, t in zip(preds, truths))
    return 2 * inter / max(1, sum(int(p.sum() + t.sum()) for p, t in zip(preds, truths)))


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
    return [m == 1 for m in out["mask"]]


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
    threshold, base = threshold_baseline(data["train"], data["held"])
    images, truths = [im for im, _ in data["held"]], [m for _, m in data["held"]]
    rows = [{"run": f"threshold > {threshold:g} (fitted on the training tiles)", "dice": {"-": round(base, 4)}}]
    for mode in args.modes:
        out = os.path.join(args.workdir, "run-" + (mode.replace(":", "_") or "plan"))
        t0 = time.time()
        summary = train(data=(os.path.join(args.workdir, "train"),), val_data=(os.path.join(args.workdir, "val"),), output=out,
                        model="unet", num_classes=2, epochs=args.epochs, lr=3e-3, workers=1, seed=args.seed, intensity=mode, quiet=True,
                        address="local")
        best = os.path.join(out, "best")
        plan = {k: v["value"] for k, v in summary["plan"].items()}
        scores = {g: round(dice(predict(best, images, g), truths), 4) for g in ("native", "resize")}
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
