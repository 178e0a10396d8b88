"""`rayseg bench` on a tiny archive: every figure is produced, the JSON written, the table printed (sizes not judged).
One round here; `--repeat`'s rounds and medians are tested in tests/unit/test_bench.py."""

from __future__ import annotations

import json
import math

import pytest

from rayseg.cli import main

pytestmark = pytest.mark.timeout(300)

FIGURES = {
    "model_only": ("images_per_s", "ratio", "peak_rss_mb", "cpu_ms_per_image"),
    "naive": ("steady_images_per_s", "steady_ratio", "e2e_images_per_s", "e2e_ratio", "e2e_s", "peak_rss_mb", "memory_growth", "cpu_ms_per_image"),
    "pipeline": ("steady_images_per_s", "steady_ratio", "e2e_images_per_s", "e2e_ratio", "e2e_s", "peak_rss_mb", "memory_growth", "cpu_ms_per_image",
                 "startup_s", "exit_s", "startup_command_s", "startup_ray_ready_s", "startup_predictor_ready_s", "startup_first_batch_s"),
    "targets": ("steady_vs_naive", "steady_vs_model_only", "e2e_vs_naive"),
}


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.flow("bench")
def test_bench_produces_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--count", "24", "--small-count", "8", "--model", "unet", "--input-size", "64",
               "--min-seconds", "0.5", "--json", str(out), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    res = json.loads(out.read_text())
    for section, keys in FIGURES.items():
        for key in keys:
            assert positive(res[section][key]), f"{section}.{key} = {res[section].get(key)!r}"
    assert res["counts"] == {"large": 24, "small": 8}
    p = res["pipeline"]  # the start-up steps in the order they happen, all before the run is done
    steps = [p[f"startup_{k}_s"] for k in ("command", "ray_ready", "predictor_ready", "first_batch")]
    assert steps == sorted(steps) and steps[-1] < p["e2e_s"] and p["startup_dashboard"] is False
    assert res["rounds"] == []  # one round (rounds and their medians: tests/unit/test_bench.py)
    spill = res["pipeline"]["spill_mb"]
    assert spill is None or (math.isfinite(spill) and spill >= 0)
    assert res["pipeline"]["errors"] == 0
    for section in ("model_only", "naive", "pipeline"):
        assert res[section]["device_busy"] is None  # no GPU here: n/a
    m = res["machine"]
    assert m["cores"] >= 1 and m["ram_gib"] > 0 and m["cpu"] and m["date"]

    table = capsys.readouterr().out
    for label in ("model-only", "naive steady", "naive end-to-end 24", "pipeline steady", "pipeline end-to-end 24", "start-up", "peak memory",
                  "small run, 8 images end to end: naive"):
        assert label in table
    assert "n/a" in table  # device busy on CPU

    # both runs of each measured path wrote their rows; the pipeline its summary
    work = tmp_path / "work"
    assert (work / "out-pipeline-large" / "_rayseg.json").exists()
    import pyarrow.parquet as pq

    assert pq.read_table(work / "out-naive-large").num_rows == 24
    assert pq.read_table(work / "out-pipeline-large" / "images").num_rows == 24


def test_bench_refuses_counts_it_cannot_separate(capsys):
    assert main(["bench", "--count", "8", "--small-count", "8"]) == 2
    assert "--small-count" in capsys.readouterr().err
