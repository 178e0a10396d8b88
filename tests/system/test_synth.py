"""rayseg synth writing straight to object storage (a moto S3 server on loopback)."""

from __future__ import annotations

import fsspec
import h5py
import numpy as np

from rayseg.synth import write_archive


def test_s3_urls(s3):
    bucket, options = s3
    summary = write_archive(f"{bucket}/synth", "h5", 2, labelled=True, storage_options=options, min_size=32, max_size=48)
    fs, _ = fsspec.core.url_to_fs(bucket, **options)
    with fs.open(summary["files"][0], "rb") as f, h5py.File(f, "r") as h5:
        assert h5["images"].shape[0] == 2 and h5["masks"].dtype == np.uint8
