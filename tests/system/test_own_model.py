"""Models of one's own through `rayseg segment` and `nightly`: a rayseg checkpoint exported to ONNX and .pt2, an smp
Unet through its adapter and through an entry point, a SegFormer folder, and the probe that fails in the driver.

All models are random-weight ones built from configs, so nothing is downloaded."""

from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch

from rayseg import cli, segment
from rayseg.nightly import NightlyConfig, nightly
from rayseg.stats import decode_png
from rayseg.table import read_table

SIDE = 64


def masks_of(out: str) -> dict[str, np.ndarray]:
    rows = read_table(out).to_table(columns=["image_id", "mask_png", "error"]).to_pylist()
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    return {r["image_id"].rsplit("/", 1)[-1]: decode_png(r["mask_png"]) for r in rows}


@pytest.fixture(scope="module")
def grey_archive(tmp_path_factory):
    """Four 16-bit and two 8-bit grey PNGs at the model's input size: blobs on a dim background."""
    root = tmp_path_factory.mktemp("grey")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for i in range(6):
        cy, cx, r = rng.integers(12, 52, 2).tolist() + [int(rng.integers(6, 14))]
        img = 300 + rng.normal(0, 40, (SIDE, SIDE)) + 2500 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        if i < 4:
            cv2.imwrite(str(root / f"deep{i}.png"), np.clip(img, 0, 65535).astype(np.uint16))
        else:
            cv2.imwrite(str(root / f"eight{i}.png"), np.clip(img / 12, 0, 255).astype(np.uint8))
    return str(root)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A rayseg UNet checkpoint (1 channel, percentile normalisation, 3 classes) and its ONNX and .pt2 exports."""
    from rayseg.config import ExportConfig
    from rayseg.export import export
    from rayseg.models import ModelCard, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    model = build_model("unet", 3, in_channels=1).eval()
    yy, xx = np.mgrid[:SIDE, :SIDE]
    blobs = torch.tensor(np.stack([((yy - c) ** 2 + (xx - 25) ** 2 < 150) * 2.0 - 0.5 for c in (20, 40)]), dtype=torch.float32)[:, None]
    with torch.no_grad():  # a random UNet gives one class everywhere; centred on blobs, its masks follow the image
        model.head.bias -= model(blobs).mean((0, 2, 3))
    card = ModelCard("unet", 3, input_size=SIDE, in_channels=1, mean=(0.449,), std=(0.226,),
                     intensity={"mode": "percentile", "spec": "percentile:1:99.8", "low": 1.0, "high": 99.8})
    ckpt = str(root / "ckpt")
    save_checkpoint(model, card, ckpt)
    files = {}
    for fmt in ("onnx", "pt2"):
        files[fmt] = str(root / f"unet.{fmt}")
        summary = export(ExportConfig(checkpoint=ckpt, to=fmt, output=files[fmt]))
        assert all(c["ok"] for c in summary["checks"]) and len(summary["checks"]) == 2
        assert max(c["logits_max_rel_diff"] for c in summary["checks"]) <= 1e-3
    return ckpt, files


@pytest.mark.flow("own-model-export")
def test_exported_files_segment_like_the_checkpoint(ray_local, grey_archive, exported, tmp_path):
    ckpt, files = exported
    segment(inputs=[grey_archive], output=str(tmp_path / "ckpt"), checkpoint=ckpt, quiet=True)
    want = masks_of(str(tmp_path / "ckpt"))
    assert len(want) == 6 and len({m.tobytes() for m in want.values()}) > 1
    for fmt, path in files.items():
        extra = {"trust_model_code": True} if fmt == "pt2" else {}
        summary = segment(inputs=[grey_archive], output=str(tmp_path / fmt), model=path, quiet=True, **extra)
        assert summary["model"].startswith(f"{fmt}:unet.{fmt}@")
        got = masks_of(str(tmp_path / fmt))
        assert got.keys() == want.keys()
        agree = np.mean([np.mean(got[k] == want[k]) for k in want])
        assert agree >= 0.999, (fmt, agree)


@pytest.mark.flow("own-model-hf")
def test_segformer_folder_segments_like_its_own_logits_upsampled(ray_local, tmp_path):
    pytest.importorskip("transformers")
    from unit.test_adapters import tiny_segformer

    model = tiny_segformer(str(tmp_path / "segformer"))
    rng = np.random.default_rng(4)
    images = {f"rgb{i}.png": rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for i in range(3)}
    (tmp_path / "in").mkdir()
    for name, img in images.items():
        cv2.imwrite(str(tmp_path / "in" / name), img[..., ::-1])  # OpenCV writes BGR
    summary = segment(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), model=f"hf:{tmp_path / 'segformer'}", quiet=True)
    assert summary["classes"] == ["c0", "c1", "c2"] and summary["model"].startswith("hf:segformer@")
    got = masks_of(str(tmp_path / "out"))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for name, img in images.items():
        x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - mean) / std
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        assert logits.shape[-1] == SIDE // 4
        want = torch.nn.functional.interpolate(logits, size=(SIDE, SIDE), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        assert np.mean(got[name] == want) >= 0.999, name


@pytest.mark.flow("own-model-nightly")
def test_nightly_with_an_onnx_model_reprocesses_when_the_file_changes(ray_local, tmp_path):
    from unit.test_adapters import conv_onnx

    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        cv2.imwrite(str(tmp_path / "in" / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    model = conv_onnx(tmp_path / "seg.onnx", meta={"num_classes": 3})
    cfg = dict(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=model, quiet=True, input_size=32)
    first = nightly(NightlyConfig(**cfg))
    assert (first["shards_new"], first["rows"], first["errors"]) == (2, 2, 0)
    assert nightly(NightlyConfig(**cfg))["nothing_new"]
    conv_onnx(tmp_path / "seg.onnx", classes=3, meta={"num_classes": 3, "class_names": ["a", "b", "c"]})  # a new file
    third = nightly(NightlyConfig(**cfg))
    assert third["model_digest"] != first["model_digest"] and third["shards_changed"] == 2
    assert set(read_table(str(tmp_path / "out")).to_table(columns=["model"]).column("model").to_pylist()) == {third["model"]}


def test_onnx_session_in_a_one_cpu_actor_uses_one_thread(ray_local, tmp_path):
    import ray

    from unit.test_adapters import conv_onnx
    from rayseg.adapters import load_model
    from rayseg.config import ModelConfig, PredictConfig

    bundle = load_model(ModelConfig(model=conv_onnx(tmp_path / "m.onnx"), num_classes=3))

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self, bundle):
            from rayseg.predict import Predictor

            opts = Predictor(bundle, PredictConfig(device="cpu", batch_size=2)).model.session.get_session_options()
            return opts.intra_op_num_threads, opts.inter_op_num_threads

    actor = Probe.remote()
    assert ray.get(actor.threads.remote(bundle), timeout=120) == (1, 1)
    ray.kill(actor)


def test_a_wrong_class_count_stops_the_driver_with_one_sentence(ray_local, tmp_path, capsys):
    from unit.test_adapters import conv_onnx

    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    model = conv_onnx(tmp_path / "m.onnx", classes=4)
    rc = cli.main(["segment", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", model, "--num-classes", "3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[0].startswith("rayseg segment: error: the model onnx:m.onnx@") and "outputs 4 classes but its card says 3" in err[0]
    assert not (tmp_path / "out").exists()
