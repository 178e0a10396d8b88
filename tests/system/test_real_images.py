"""Real images shipped inside registry packages (the `examples` extra), nothing downloaded:

- stardist's img2d.tif / mask2d.tif: a 16-bit fluorescence image of nuclei (values 0..235 of 65,535) from the
  2018 Data Science Bowl, with its instance labels;
- pydicom's CT_small.dcm: a signed 16-bit CT slice, in Hounsfield units here;
- scikit-image's coins: an 8-bit photograph.

The nuclei image, cut into tiles, trains a UNet through `rayseg train` (instance labels as --mask-mode binary) and is
scored on tiles it did not see; the CT slice and the coins are segmented with that model and reported.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("tifffile")
if importlib.util.find_spec("stardist") is None:
    pytest.skip("needs the examples extra (stardist ships the nuclei image)", allow_module_level=True)

TILE = 64


def stardist_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """stardist.data.test_image_nuclei_2d(return_mask=True), read from the wheel's files without importing stardist
    (its import pulls numba and csbdeep)."""
    import tifffile

    folder = os.path.join(importlib.util.find_spec("stardist").submodule_search_locations[0], "data", "images")
    return tifffile.imread(os.path.join(folder, "img2d.tif")), tifffile.imread(os.path.join(folder, "mask2d.tif"))


def export_nuclei(root) -> dict[str, int]:
    """The 512x512 image as 64 tiles of 64x64 in images/ and masks/ folders (16-bit TIFFs, instance ids as they
    come): rows 0-5 train, row 6 validates, row 7 tests."""
    import tifffile

    image, labels = stardist_nuclei()
    counts = {}
    for r in range(image.shape[0] // TILE):
        split = "train" if r < 6 else "val" if r == 6 else "test"
        for c in range(image.shape[1] // TILE):
            window = np.s_[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
            for side, arr in (("images", image), ("masks", labels)):
                os.makedirs(root / split / side, exist_ok=True)
                tifffile.imwrite(root / split / side / f"r{r}c{c}.tif", arr[window], compression="zlib")
            counts[split] = counts.get(split, 0) + 1
    return counts


def test_the_sample_images_are_what_the_readme_says():
    image, labels = stardist_nuclei()
    assert image.dtype == np.uint16 and image.shape == (512, 512) and image.max() <= 300  # a narrow 16-bit band
    assert labels.max() > 100  # instance ids, not classes


@pytest.mark.flow("real-images")
def test_stardist_nuclei_train_and_segment_then_ct_and_coins_are_reported(ray_local, tmp_path):
    import pydicom
    import skimage.data
    import tifffile
    from pydicom.data import get_testdata_file

    from rayseg.config import ReportConfig
    from rayseg.evaluate import evaluate
    from rayseg.models import load_bundle
    from rayseg.report import report
    from rayseg.segment import segment
    from rayseg.train import train

    counts = export_nuclei(tmp_path / "nuclei")  # 6 epochs: held-out Dice 0.9 from epoch 3 (12 gave 0.915); start-up is most of train()
    assert counts == {"train": 48, "val": 8, "test": 8}
    summary = train(data=(str(tmp_path / "nuclei" / "train"),), val_data=(str(tmp_path / "nuclei" / "val"),), output=str(tmp_path / "run"),
                    model="unet", num_classes=2, class_names=("background", "nucleus"), input_size=TILE, epochs=6, batch_size=4,
                    lr=3e-3, workers=1, mask_mode="binary", quiet=True)
    best = str(tmp_path / "run" / "best")
    card = load_bundle(best).card
    assert summary["bad_pairs"] == 0 and card.in_channels == 1 and card.intensity["mode"] == "nonzero"  # planned: per-image z-score
    result = evaluate(checkpoint=best, data=(str(tmp_path / "nuclei" / "test"),), mask_mode="binary", quiet=True)
    print(f"stardist nuclei, held-out tiles: Dice {result['dice'][1]:.3f}, IoU {result['iou'][1]:.3f}")
    assert result["pairs"] == 8 and result["dice"][1] > 0.8

    # unlabelled real images: a CT slice in Hounsfield units (int16 TIFF) and an 8-bit photograph
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = (ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)).astype(np.int16)
    real = tmp_path / "real"
    real.mkdir()
    tifffile.imwrite(real / "ct_small.tif", hu)
    tifffile.imwrite(real / "coins.tif", skimage.data.coins())
    out = tmp_path / "seg"
    seg = segment(inputs=(str(real),), output=str(out), checkpoint=best, intensity="percentile:1:99.8", quiet=True)
    rows = pq.read_table(out / "images").to_pylist()
    assert seg["errors"] == 0 and sorted((r["height"], r["width"]) for r in rows) == [(128, 128), (303, 384)]
    report(ReportConfig(output=str(out), html=str(tmp_path / "report.html"), sample=2))
    assert (tmp_path / "report.html").stat().st_size > 1000
