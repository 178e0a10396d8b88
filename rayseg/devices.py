"""What each predictor actor runs with (device, torch and CUDA versions, driver, precision, batch size), gathered
for the summary.

The actors write it into Ray's key-value store, which lives in the GCS: an actor to gather a few dicts would take
a worker process of its own (hundreds of MB on a small machine). The store is Ray's internal one (the one Ray's
own libraries keep their state in); tests/system/test_gpu_plan.py checks that the summary gets what was written.
"""

from __future__ import annotations

import contextlib
import json
import uuid

from ray.experimental import internal_kv

NAMESPACE = "rayseg"


class DeviceLog:
    """One run's reports, under a key of its own; picklable, so the actors get it as their `report` callable."""

    def __init__(self):
        self.prefix = f"devices/{uuid.uuid4().hex}/"

    def __call__(self, key: str, info: dict) -> None:
        internal_kv._internal_kv_put(self.prefix + key, json.dumps(info), overwrite=True, namespace=NAMESPACE)

    def devices(self) -> list[dict]:
        """The distinct setups reported, each with how many actors ran it."""
        groups: dict[str, dict] = {}
        for key in sorted(internal_kv._internal_kv_list(self.prefix, namespace=NAMESPACE)):
            info = json.loads(internal_kv._internal_kv_get(key, namespace=NAMESPACE))
            groups.setdefault(repr(sorted(info.items())), {**info, "actors": 0})["actors"] += 1
        return list(groups.values())

    def clear(self) -> None:
        internal_kv._internal_kv_del(self.prefix, del_by_prefix=True, namespace=NAMESPACE)


@contextlib.contextmanager
def gathered(log: DeviceLog):
    """Around a plan's run: a predictor's CUDA failure, which reaches the driver wrapped by Ray, becomes its one
    EnvError sentence; the run's reports are cleared from the store afterwards."""
    from rayseg.predict import device_error_of

    try:
        yield log
    except Exception as e:
        env = device_error_of(e)
        if env is None:
            raise
        raise env from None
    finally:
        log.clear()
