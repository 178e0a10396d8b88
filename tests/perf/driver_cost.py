"""The nightly driver's cost per 10,000 rows: CPU seconds (getrusage RUSAGE_SELF of the driver process) and the
bytes of the batches the plan hands it (every Arrow batch the driver iterates), marginal between a small and a
large archive so that start-up (imports, Ray, the model) cancels out.

    rayseg synth /tmp/dc/in400 --layout tar --count 400 --shards 4 --min-size 256 --max-size 256
    rayseg synth /tmp/dc/in4000 --layout tar --count 4000 --shards 40 --min-size 256 --max-size 256
    python tests/perf/driver_cost.py /tmp/dc/in400 /tmp/dc/in4000 [--command segment] [--model unet] [--batch-size 64]

Each size runs in a fresh process: an embedded Ray (`ray.init(num_cpus=2)`, started before the measurement), then
`rayseg.nightly.nightly` (or `rayseg.segment.segment`) in that process (pointwise model unless --model, 2
classes, default options but --quiet). Besides the cost per 10,000 rows it prints the driver's marginal CPU per
second of run (`driver_cpu_share`): Ray Data's scheduling loop wakes at least every 0.1 s whatever the rate, so
on a slow machine much of the cost per row is really a cost per second, which a fast cluster divides by its rate. The bytes are
those of every batch the driver iterates: since workers write the data files, the write stage's file metadata.
To measure another checkout, run this script with PYTHONPATH pointing at it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time


def one(inputs: str, out: str, command: str, model: str, batch_size: str) -> dict:
    import ray
    import ray.data

    from rayseg.runtime import LOCAL_SYSTEM_CONFIG

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)

    from rayseg.config import NightlyConfig, SegmentConfig
    from rayseg.nightly import nightly
    from rayseg.segment import segment

    received = [0]
    iterate = ray.data.Dataset.iter_batches

    def counted(self, *args, **kwargs):
        for batch in iterate(self, *args, **kwargs):
            received[0] += batch.nbytes
            yield batch

    ray.data.Dataset.iter_batches = counted
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if command == "nightly":
        summary = nightly(NightlyConfig(inputs=(inputs,), output=out, model=model, num_classes=2, quiet=True, batch_size=int(batch_size)))
    else:
        summary = segment(SegmentConfig(inputs=(inputs,), output=out, model=model, num_classes=2, quiet=True, batch_size=int(batch_size)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rows": summary["rows"] if command == "nightly" else summary["images"], "driver_cpu_s": round(cpu, 2),
            "driver_bytes": received[0], "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    if sys.argv[1] == "--one":
        print(json.dumps(one(*sys.argv[2:7])))
        return
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("small")
    ap.add_argument("large")
    ap.add_argument("--command", choices=["nightly", "segment"], default="nightly")
    ap.add_argument("--model", default="pointwise")
    ap.add_argument("--batch-size", default="16", help="images per predictor batch, so per block of the plan")
    a = ap.parse_args()
    small, large = (json.loads(subprocess.run([sys.executable, __file__, "--one", inp, tempfile.mkdtemp() + "/out", a.command, a.model,
                                               a.batch_size],
                                              check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                    for inp in (a.small, a.large))
    rows = large["rows"] - small["rows"]
    print(json.dumps({"command": a.command, "model": a.model, "batch_size": int(a.batch_size), "small": small, "large": large,
                      "wall_s_per_10k_rows": round((large["wall_s"] - small["wall_s"]) / rows * 10_000, 1),
                      "driver_cpu_share": round((large["driver_cpu_s"] - small["driver_cpu_s"]) / (large["wall_s"] - small["wall_s"]), 3),
                      "driver_cpu_s_per_10k_rows": round((large["driver_cpu_s"] - small["driver_cpu_s"]) / rows * 10_000, 2),
                      "driver_bytes_per_10k_rows": round((large["driver_bytes"] - small["driver_bytes"]) / rows * 10_000)}, indent=1))


if __name__ == "__main__":
    main()
