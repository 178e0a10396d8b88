"""The nightly driver's cost per 10,000 rows: CPU seconds (getrusage RUSAGE_SELF of the driver process) and the
bytes of the batches the plan hands it (every Arrow batch the driver iterates), marginal between a small and a
large archive so that start-up (imports, Ray, the model) cancels out.

    rayseg synth /tmp/dc/in400 --layout tar --count 400 --shards 4 --min-size 256 --max-size 256
    rayseg synth /tmp/dc/in4000 --layout tar --count 4000 --shards 40 --min-size 256 --max-size 256
    python tests/perf/driver_cost.py /tmp/dc/in400 /tmp/dc/in4000

Each size runs in a fresh process: an embedded Ray (`ray.init(num_cpus=2)`, started before the measurement), then
`rayseg.nightly.nightly` in that process (pointwise model, 2 classes, default options but --quiet). The bytes are
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


def one(inputs: str, out: str) -> dict:
    import ray
    import ray.data

    from rayseg.runtime import LOCAL_SYSTEM_CONFIG

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)

    from rayseg.nightly import NightlyConfig, nightly

    received = [0]
    iterate = ray.data.Dataset.iter_batches

    def counted(self, *args, **kwargs):
        for batch in iterate(self, *args, **kwargs):
            received[0] += batch.nbytes
            yield batch

    ray.data.Dataset.iter_batches = counted
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    summary = nightly(NightlyConfig(inputs=(inputs,), output=out, model="pointwise", num_classes=2, quiet=True))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rows": summary["rows"], "waves": len(summary["waves"]), "driver_cpu_s": round(cpu, 2),
            "driver_bytes": received[0], "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    if sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
        return
    small, large = (json.loads(subprocess.run([sys.executable, __file__, "--one", inp, tempfile.mkdtemp() + "/out"],
                                              check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                    for inp in sys.argv[1:3])
    rows = large["rows"] - small["rows"]
    print(json.dumps({"small": small, "large": large,
                      "driver_cpu_s_per_10k_rows": round((large["driver_cpu_s"] - small["driver_cpu_s"]) / rows * 10_000, 2),
                      "driver_bytes_per_10k_rows": round((large["driver_bytes"] - small["driver_bytes"]) / rows * 10_000)}, indent=1))


if __name__ == "__main__":
    main()
