"""rayseg demo, reduced: the whole loop (synth, train, segment, evaluate) completes and says where things are.

The full demo (defaults) is measured by hand: `time rayseg demo --workdir /tmp/demo`.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from rayseg.demo import MARKER, demo, report
from rayseg.errors import UserError


@pytest.mark.flow("demo")
def test_reduced_demo_runs_end_to_end_and_prints_paths(ray_local, tmp_path):
    workdir = tmp_path / "demo"
    r = demo(str(workdir), train_count=16, val_count=4, test_count=4, unlabelled_count=4, size=32, epochs=1, batch_size=4)
    text = report(r)
    for key in ("best_checkpoint", "segments", "evaluation", "train_summary", "segment_summary"):
        assert r[key] in text and os.path.exists(r[key]), key
    assert sorted(os.listdir(r["best_checkpoint"])) == ["model.json", "model.pt"]
    assert r["segmented_images"] == 4 and r["test_images"] == 4
    assert json.loads(open(r["evaluation"]).read())["miou"] == r["test_miou"]
    assert f"{r['test_miou']:.4f}" in text and "mIoU" in text
    # the report of the held-out segmentation comes first, as a URL a terminal can open
    assert text.splitlines()[0].split() == ["report", r["report_url"]]
    assert r["report_url"] == "file://" + r["report"] and r["report"] == str(workdir / "report.html")
    page = open(r["report"], encoding="utf-8").read()
    images = re.findall(r'<img[^>]* src="data:image/(?:png|jpeg);base64,[A-Za-z0-9+/=]{100,}"', page)
    assert len(images) >= 4, "overlays of the segmented images, embedded"
    assert "<th>Images (rows)</th><td>4</td>" in page


def test_demo_refuses_a_workdir_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not made by `rayseg demo`"):
        demo(str(tmp_path))
    assert (tmp_path / "precious.txt").exists() and not (tmp_path / MARKER).exists()
