"""The device a predictor runs on: whether CUDA can start (and if not, why, in one sentence), how host batches
reach it, and what each predictor actor runs with (device, torch and CUDA versions, driver, precision, batch
size), gathered for the summary.

The actors write it into Ray's key-value store, which lives in the GCS: an actor to gather a few dicts would take
a worker process of its own (hundreds of MB on a small machine). The store is Ray's internal one (the one Ray's
own libraries keep their state in); tests/system/test_gpu_plan.py checks that the summary gets what was written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import uuid

import numpy as np
import torch
from ray.experimental import internal_kv

from rayseg.errors import EnvError

NAMESPACE = "rayseg"


# The oldest NVIDIA driver each CUDA major version runs on (minor-version compatibility; NVIDIA's CUDA release notes)
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version on this node, or None where there is none (NVML, then the kernel module)."""
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:
        pass
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", open("/proc/driver/nvidia/version").read())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_problem() -> str | None:
    """Why CUDA cannot start in this process, in words, or None when it can."""
    if torch.cuda.is_available():
        return None
    host, built = socket.gethostname(), torch.version.cuda
    if built is None:
        return f"torch {torch.__version__} on {host} is a CPU-only build; install a CUDA build of torch"
    driver = nvidia_driver_version()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if driver is None:
        return (f"no NVIDIA GPU or driver is visible to this worker on {host} (CUDA_VISIBLE_DEVICES={visible!r}); "
                f"run GPU actors only where Ray's GPU resources are real GPUs")
    need = MIN_DRIVER.get(int(built.split(".")[0]))
    if need and int(driver.split(".")[0]) < need:
        return (f"torch {torch.__version__} is built for CUDA {built}, which needs an NVIDIA driver >= {need}, and {host} has "
                f"driver {driver}; install torch built for an older CUDA (e.g. pip install torch --index-url "
                f"https://download.pytorch.org/whl/cu126) or a newer driver")
    return (f"torch {torch.__version__} (CUDA {built}) cannot start CUDA on {host} although NVIDIA driver {driver} is there "
            f"(CUDA_VISIBLE_DEVICES={visible!r}): a driver/CUDA mismatch, or the GPU is not passed to the container")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        problem = cuda_problem()
        if problem:
            raise EnvError(f"the predictor must run on a GPU, but {problem}")
    return torch.device(device)


def device_error_of(exc: BaseException) -> EnvError | None:
    """The EnvError a predictor raised in an actor, out of Ray's wrapping (RayActorError, ActorDiedError,
    UserCodeException...): an actor that dies in its constructor reaches the driver only as text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc) is EnvError:
            return exc
        m = re.findall(r"rayseg\.errors\.EnvError: (.+)", str(exc))
        if m:
            return EnvError(m[-1].strip())
        exc = getattr(exc, "cause", None) if isinstance(getattr(exc, "cause", None), BaseException) else (exc.__cause__ or exc.__context__)
    return None


class HostFeed:
    """Host batches onto the device, any dtype and channel count (NHWC or HWC arrays or tensors, or a list of HWC
    arrays of one shape), as NHWC tensors there.

    On CUDA: one host copy, into one of two reusable pinned buffers (a fresh pinned tensor per batch costs a
    cudaHostAlloc each time), then an asynchronous copy on a stream of its own, so the next batch's copy runs
    while the current one computes (`prefetch`). On CPU the batch is used where it is: no copy but np.stack.
    """

    SLOTS = 2  # the batch being computed and the next one being copied

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.buffers: list[torch.Tensor | None] = [None] * self.SLOTS
        self.copied: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self.turn = 0
        self.ahead: tuple[list, torch.Tensor] | None = None  # (the images, their tensor on the device) of a prefetch

    def __call__(self, images) -> torch.Tensor:
        if self.ahead is not None:
            key, t = self.ahead
            self.ahead = None
            if _same(key, images):
                return t
        if not self.cuda:
            return torch.from_numpy(np.stack(images)) if isinstance(images, list) else torch.as_tensor(images)
        first = images[0] if isinstance(images, list) else images
        dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype if isinstance(first, np.ndarray) else first.dtype
        shape = (len(images), *first.shape) if isinstance(images, list) else tuple(images.shape)
        slot, self.turn = self.turn, (self.turn + 1) % self.SLOTS
        host = self._pinned(slot, dtype, shape)
        if isinstance(images, list):
            for i, im in enumerate(images):
                host[i].copy_(torch.from_numpy(im))
        else:
            host.copy_(torch.as_tensor(images))
        with torch.cuda.stream(self.stream):
            t = host.to(self.device, non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record(self.stream)
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        t.record_stream(main)  # made on the copy stream, used on the main one: the allocator must know
        return t

    def prefetch(self, images) -> None:
        """Start copying `images` now; the next call with the same images gets the tensor without waiting."""
        if self.cuda and len(images):
            self.ahead = (images, self(images))

    def _pinned(self, slot: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy that last read this buffer has finished
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        buf = self.buffers[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[slot] = torch.empty(max(nbytes, 2 * (0 if buf is None else buf.numel())), dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes].view(dtype).view(shape)


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a is b


class DeviceLog:
    """One run's reports, under a key of its own; picklable, so the actors get it as their `report` callable.

    It also keeps when each of a run's first events happened (`stamp`): the first predictor ready, the first batch
    done. The first writer of an event keeps it, so one small write per actor, not per batch.
    """

    def __init__(self):
        self.prefix = f"devices/{uuid.uuid4().hex}/"

    def __call__(self, key: str, info: dict) -> None:
        internal_kv._internal_kv_put(self.prefix + key, json.dumps(info), overwrite=True, namespace=NAMESPACE)

    def devices(self) -> list[dict]:
        """The distinct setups reported, each with how many actors ran it."""
        groups: dict[str, dict] = {}
        for key in sorted(internal_kv._internal_kv_list(self.prefix, namespace=NAMESPACE)):
            if b"/@" in key:  # a stamp, not a device
                continue
            info = json.loads(internal_kv._internal_kv_get(key, namespace=NAMESPACE))
            groups.setdefault(repr(sorted(info.items())), {**info, "actors": 0})["actors"] += 1
        return list(groups.values())

    def stamp(self, event: str) -> None:
        """The wall-clock time of `event`, kept only if no actor stamped it before."""
        internal_kv._internal_kv_put(f"{self.prefix}@{event}", repr(time.time()), overwrite=False, namespace=NAMESPACE)

    def stamps(self) -> dict[str, float]:
        """{event: wall-clock time} of what was stamped."""
        keys = internal_kv._internal_kv_list(f"{self.prefix}@", namespace=NAMESPACE)
        return {k.decode().rsplit("@", 1)[1]: float(internal_kv._internal_kv_get(k, namespace=NAMESPACE)) for k in keys}

    def clear(self) -> None:
        internal_kv._internal_kv_del(self.prefix, del_by_prefix=True, namespace=NAMESPACE)


@contextlib.contextmanager
def gathered(log: DeviceLog):
    """Around a plan's run: a predictor's CUDA failure, which reaches the driver wrapped by Ray, becomes its one
    EnvError sentence; the run's reports are cleared from the store afterwards."""
    try:
        yield log
    except Exception as e:
        env = device_error_of(e)
        if env is None:
            raise
        raise env from None
    finally:
        log.clear()
