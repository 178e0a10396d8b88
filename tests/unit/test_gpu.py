"""The GPU path: bf16 predictor against fp32 on CPU, batch size from device memory. Skipped without a CUDA device
(CI has none); run on a GPU machine with `python -m pytest -q tests/unit/test_gpu.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayseg.models import load_bundle
from rayseg.config import PredictConfig
from rayseg.predict import MAX_AUTO_BATCH_SIZE, Predictor, fit_batch_size

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_batch_size_is_the_largest_power_of_two_in_half_the_free_memory():
    mib = 2**20
    assert fit_batch_size(100 * mib, 1600 * mib) == 8  # 8 x 100 = 800 = half of 1600
    assert fit_batch_size(100 * mib, 1599 * mib) == 4
    assert fit_batch_size(1 * mib, 80 * 2**30) == MAX_AUTO_BATCH_SIZE  # capped
    assert fit_batch_size(10 * 2**30, 1 * 2**30) == 1  # never below one image


def batch_of(images: list[np.ndarray]) -> dict:
    n = len(images)
    batch = {"image_id": np.array([str(i) for i in range(n)], dtype=object), "error": np.array([None] * n, dtype=object),
             "image": np.empty(n, dtype=object)}
    batch["image"][:] = images
    return batch


def test_cpu_batch_size_defaults_to_16():
    p = Predictor(load_bundle(None, "pointwise", 2, input_size=32), PredictConfig(device="cpu"), threads=1)
    assert p.batch_size == 16


@needs_gpu
def test_gpu_bf16_masks_agree_with_cpu_fp32_and_batch_size_comes_from_memory():
    bundle = load_bundle(None, "lraspp_mobilenet_v3_large", 3, input_size=128)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(6)] + [rng.integers(0, 256, (90, 200, 3), dtype=np.uint8)]
    cpu = Predictor(bundle, PredictConfig(device="cpu", precision="fp32"), threads=1)(batch_of(images))
    gpu_predictor = Predictor(bundle, PredictConfig(device="cuda"))  # auto: bf16, batch size probed
    gpu = gpu_predictor(batch_of(images))
    n = gpu_predictor.batch_size
    assert 1 <= n <= MAX_AUTO_BATCH_SIZE and n & (n - 1) == 0
    for a, b in zip(cpu["mask"], gpu["mask"]):
        assert a.shape == b.shape
        assert (a == b).mean() > 0.97  # bf16 moves only near-ties
    np.testing.assert_allclose(gpu["mean_confidence"], cpu["mean_confidence"], atol=0.02)


def test_without_cuda_the_reason_names_the_driver_and_the_cuda_build(monkeypatch):
    from rayseg import devices as predict
    from rayseg.errors import EnvError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(predict, "nvidia_driver_version", lambda: "550.54.15")
    with pytest.raises(EnvError) as e:
        predict.resolve_device("cuda")
    msg = str(e.value)
    assert "CUDA 13.0" in msg and ">= 580" in msg and "550.54.15" in msg and "\n" not in msg
    monkeypatch.setattr(predict, "nvidia_driver_version", lambda: None)
    assert "no NVIDIA GPU or driver is visible" in predict.cuda_problem()
    monkeypatch.setattr(predict, "nvidia_driver_version", lambda: "580.65.06")
    assert "driver/CUDA mismatch" in predict.cuda_problem()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in predict.cuda_problem()
    assert predict.resolve_device("auto").type == "cpu"  # auto on its own still means: CUDA if it starts


def test_an_env_error_from_an_actor_constructor_is_unwrapped_from_rays_text():
    from ray.exceptions import ActorDiedError

    from rayseg.errors import EnvError
    from rayseg.devices import device_error_of

    wrapped = ActorDiedError()
    wrapped.error_msg = ("The actor died because of an error raised in its creation task, ray::MapWorker(...)\n  File \"x.py\"\n"
                         "rayseg.errors.EnvError: the predictor must run on a GPU, but no NVIDIA GPU or driver is visible\n")
    outer = RuntimeError("Ray Data failed")  # what Ray Data raises, with the actor's death as its cause
    outer.__cause__ = wrapped
    err = device_error_of(outer)
    assert isinstance(err, EnvError) and str(err) == "the predictor must run on a GPU, but no NVIDIA GPU or driver is visible"
    assert device_error_of(RuntimeError("something else")) is None
    plain = EnvError("x")
    assert device_error_of(plain) is plain


@needs_gpu
def test_host_feed_reuses_pinned_buffers_for_any_dtype_and_channel_count():
    from rayseg.devices import HostFeed

    feed = HostFeed(torch.device("cuda"))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), rng.random((2, 32, 32, 1), dtype=np.float32),
               [rng.integers(0, 65535, (16, 16, 4), dtype=np.uint16) for _ in range(3)], rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)]
    for b in batches:
        want = np.stack(b) if isinstance(b, list) else b
        got = feed(b)
        assert got.is_cuda and got.shape == want.shape
        np.testing.assert_array_equal(got.cpu().numpy(), want)
    assert all(buf is not None and buf.is_pinned() for buf in feed.buffers)
    nxt = batches[0]
    feed.prefetch(nxt)
    assert feed(nxt) is feed.ahead or feed.ahead is None  # the prefetched tensor is handed over once
