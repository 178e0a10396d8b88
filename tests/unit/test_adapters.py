"""The adapter protocol without Ray: cards, the driver's probe, and every refusal with its sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayseg.adapters import load_model, source_kind
from rayseg.config import ModelConfig, SegmentConfig
from rayseg.errors import UserError
from rayseg.predict import Predictor, fit_logits

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def conv_onnx(path, in_ch=3, classes=3, reduce=False, domain="", external=None, meta=None, fixed_channels=True):
    """A 1x1 convolution as an ONNX file: N x in_ch x H x W -> N x classes x H x W (or N x classes with `reduce`)."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(classes, in_ch, 1, 1)).astype(np.float32), "w")
    if external:
        w.data_location = TensorProto.EXTERNAL
        w.ClearField("raw_data")
        w.external_data.add(key="location", value=external)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y" if not reduce else "c"])]
    if reduce:
        nodes.append(helper.make_node("ReduceMean", ["c"], ["y"], axes=[2, 3], keepdims=0))
    if domain:
        nodes.append(helper.make_node("Magic", ["y"], ["z"], domain=domain))
    out = "z" if domain else "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_ch if fixed_channels else "c", "h", "w"])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], [w])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=json.dumps(v))
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return str(path)


def cfg(model, **kw):
    return ModelConfig(model=model, **kw)


def test_names_pick_the_source():
    assert source_kind("unet") is None
    assert source_kind("s3://b/m/seg.onnx") == ("onnx", "s3://b/m/seg.onnx")
    assert source_kind("hf:models/segformer") == ("hf", "models/segformer")
    assert source_kind("python:pkg.mod:build") == ("python", "pkg.mod:build")
    with pytest.raises(UserError, match="a model of your own"):
        SegmentConfig(inputs=("x",), output="o", model="resnet")


def test_onnx_card_from_metadata_then_flags(tmp_path):
    path = conv_onnx(tmp_path / "m.onnx", meta={"num_classes": 3, "class_names": ["bg", "cell", "edge"], "input_size": 32})
    bundle = load_model(cfg(path))  # --num-classes 2 is the default, but the file records 3: the file wins
    assert (bundle.card.num_classes, bundle.card.names(), bundle.card.input_size) == (3, ["bg", "cell", "edge"], 32)
    assert bundle.label.startswith("onnx:m.onnx@") and len(bundle.digest) == 64
    bundle2 = load_model(cfg(path, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))
    assert bundle2.card.mean == (0.5, 0.5, 0.5) and bundle2.digest != bundle.digest  # the card is part of the digest


def test_wrong_class_count_channel_count_and_output_shape_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match=r"outputs 3 classes but its card says 2; give --num-classes 3"):
        load_model(cfg(conv_onnx(tmp_path / "a.onnx")))
    with pytest.raises(UserError, match=r"takes 3 input channel\(s\), but the card says 1"):
        load_model(cfg(conv_onnx(tmp_path / "b.onnx"), in_channels=1, num_classes=3))
    with pytest.raises(UserError, match=r"fails on a probe batch of 2x1x64x64 \(its card says 1 input channel"):
        load_model(cfg(conv_onnx(tmp_path / "c.onnx", fixed_channels=False), in_channels=1, num_classes=3))
    with pytest.raises(UserError, match=r"gives \(2, 3\) for a 2x3x64x64 batch; rayseg needs logits shaped N x classes x H x W"):
        load_model(cfg(conv_onnx(tmp_path / "d.onnx", reduce=True), num_classes=3))


def test_onnx_refusals(tmp_path):
    with pytest.raises(UserError, match="custom domain 'my.ops'.*custom-op library"):
        load_model(cfg(conv_onnx(tmp_path / "custom.onnx", domain="my.ops"), num_classes=3))
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match=r"keeps the weights of 'w' in '../w.bin', outside the model's own folder; refused"):
        load_model(cfg(conv_onnx(tmp_path / "sub" / "ext.onnx", external="../w.bin"), num_classes=3))
    with pytest.raises(UserError, match="outside the model's own folder"):
        load_model(cfg(conv_onnx(tmp_path / "abs.onnx", external="/etc/passwd"), num_classes=3))
    with pytest.raises(UserError, match="is not an ONNX model"):
        (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \xff\xfe")
        load_model(cfg(str(tmp_path / "junk.onnx")))


def test_onnx_external_data_inside_its_folder_loads(tmp_path):
    np.random.default_rng(0).normal(size=(3, 3, 1, 1)).astype(np.float32).tofile(tmp_path / "w.bin")
    bundle = load_model(cfg(conv_onnx(tmp_path / "ext.onnx", external="w.bin"), num_classes=3))
    assert [n for n, _ in bundle.files] == ["model.onnx", "w.bin"]


def test_code_running_sources_need_the_trust_flag(tmp_path):
    with pytest.raises(UserError, match="a .pt2 file is unpickled when loaded, which can run any code; pass --trust-model-code"):
        load_model(cfg(str(tmp_path / "m.pt2")))
    with pytest.raises(UserError, match="a python: entry point imports and runs its module.*--trust-model-code"):
        load_model(cfg("python:os:getcwd"))
    with pytest.raises(UserError, match="returned a str, not a torch.nn.Module"):
        load_model(cfg("python:os:getcwd", trust_model_code=True))


def test_the_predictor_pads_to_the_divisor_and_upsamples_coarse_logits():
    seen = []

    def quarter(x):  # a model of stride 4 that needs multiples of 8
        seen.append(tuple(x.shape[-2:]))
        return torch.nn.functional.avg_pool2d(x[:, :2], 4)

    out = fit_logits(quarter, torch.rand(1, 3, 30, 21), divisor=8)
    assert seen == [(32, 24)] and out.shape == (1, 2, 30, 21)


def test_onnx_session_threads_follow_the_predictor(tmp_path):
    from rayseg.config import PredictConfig

    bundle = load_model(cfg(conv_onnx(tmp_path / "m.onnx"), num_classes=3))
    p = Predictor(bundle, PredictConfig(device="cpu", batch_size=4), threads=2)
    opts = p.model.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    out = p({"image": np.zeros((2, 40, 40, 3), np.uint8), "image_id": np.array(["a", "b"], dtype=object), "error": np.array([None, None])})
    assert out["mask"][0].shape == (40, 40) and list(out["error"]) == [None, None]


def smp_unet():
    """An entry point: the same smp Unet the smp: source builds by name (random weights; --weights fills them)."""
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=3)


def test_smp_unet_by_name_and_by_entry_point_gives_identical_masks(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    from safetensors.torch import save_file

    from rayseg.config import PredictConfig

    torch.manual_seed(5)
    model = smp_unet()
    save_file(model.state_dict(), str(tmp_path / "unet.safetensors"))
    model.save_pretrained(str(tmp_path / "folder"))
    weights = str(tmp_path / "unet.safetensors")
    by_name = load_model(cfg("smp:unet:resnet18", weights=weights, num_classes=3))
    by_code = load_model(cfg(f"python:{__name__}:smp_unet", weights=weights, num_classes=3, trust_model_code=True))
    by_folder = load_model(cfg(f"smp:{tmp_path / 'folder'}"))  # its config.json says 3 classes: no flag needed
    assert by_name.card.size_divisor == 32 and by_name.label.startswith("smp:unet:resnet18@")
    assert by_folder.card.architecture == "smp:Unet:resnet18" and by_folder.card.num_classes == 3
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8), "error": np.array([None] * 3)}
    masks = [Predictor(b, PredictConfig(device="cpu", batch_size=4))(dict(batch))["mask"] for b in (by_name, by_code, by_folder)]
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(*masks))
    assert len({m.tobytes() for m in masks[0]}) > 1  # not one constant mask


def test_smp_refuses_pickled_weights(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(UserError, match="cannot read the weights .* as a state dict without running code"):
        load_model(cfg("smp:unet:resnet18", weights=str(tmp_path / "evil.pt"), num_classes=3))


def tiny_segformer(folder, num_labels=3, auto_map=False, safetensors=True):
    """A random-weight SegFormer (a few thousand parameters) saved with save_pretrained, with its preprocessor config."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(num_channels=3, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1],
                             decoder_hidden_size=16, num_labels=num_labels,
                             id2label={i: f"c{i}" for i in range(num_labels)}, label2id={f"c{i}": i for i in range(num_labels)})
    torch.manual_seed(2)
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder, safe_serialization=safetensors)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    if auto_map:
        path = f"{folder}/config.json"
        d = json.load(open(path))
        d["auto_map"] = {"AutoModelForSemanticSegmentation": "modeling_evil.Evil"}
        json.dump(d, open(path, "w"))
    return model


def test_huggingface_card_and_refusals(tmp_path):
    pytest.importorskip("transformers")
    tiny_segformer(str(tmp_path / "ok"))
    bundle = load_model(cfg(f"hf:{tmp_path / 'ok'}"))
    card = bundle.card
    assert (card.num_classes, card.names(), card.input_size, card.size_divisor) == (3, ["c0", "c1", "c2"], 64, 32)
    assert card.mean == pytest.approx((0.485, 0.456, 0.406))
    tiny_segformer(str(tmp_path / "remote"), auto_map=True)
    with pytest.raises(UserError, match=r"asks for remote code \(auto_map in config.json\)"):
        load_model(cfg(f"hf:{tmp_path / 'remote'}"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"has no model.safetensors; rayseg does not load pickled weights"):
        load_model(cfg(f"hf:{tmp_path / 'pickled'}"))


def test_in_graph_normalisation_equals_the_hosts():
    """What an exported graph computes from raw pixels is what segment computes on the host (rayseg.intensity)."""
    from rayseg.export import Exported
    from rayseg.intensity import Intensity, normalise
    from rayseg.models import ModelCard

    rng = np.random.default_rng(1)
    img = rng.integers(0, 4000, (37, 53, 2)).astype(np.uint16)
    card = ModelCard("x", 2, in_channels=2, mean=(0.4, 0.5), std=(0.2, 0.3))
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    for norm in (Intensity("percentile", 1.0, 99.8), Intensity("fixed", 100.0, 3000.0),
                 Intensity("dataset", 0.5, 99.5, ((50.0, 3900.0), (10.0, 3000.0)), (2000.0, 1500.0), (900.0, 800.0), 1000)):
        graph = Exported(torch.nn.Identity(), card, norm, 1, False, False).scaled(x)[0].permute(1, 2, 0).numpy()
        host = normalise(img, norm, card.mean, card.std)
        np.testing.assert_allclose(graph, host, rtol=1e-5, atol=1e-3)


def test_a_graph_for_8bit_pixels_turns_deeper_images_into_error_rows():
    from rayseg.intensity import Inputs
    from rayseg.models import ModelCard

    card = ModelCard("onnx:x", 2, in_channels=1, intensity={"mode": "none", "spec": "none"}, input_dtypes=("uint8",))
    images = [np.zeros((8, 8, 1), np.uint8), np.zeros((8, 8, 1), np.uint16)]
    _, errors = Inputs(card)(images, None, [None, None])
    assert errors == [None, "the model takes uint8 images; this one is uint16"]


def test_with_mask_adds_the_argmax_and_the_top_probability():
    from rayseg.export import Exported
    from rayseg.intensity import Intensity
    from rayseg.models import ModelCard

    model = torch.nn.Conv2d(1, 3, 1)
    card = ModelCard("x", 3, in_channels=1, mean=(0.0,), std=(1 / 255,))
    logits, mask, prob = Exported(model, card, Intensity("none"), 1, False, True)(torch.rand(2, 1, 16, 24) * 255)
    assert torch.equal(mask, logits.argmax(1).to(torch.uint8))
    assert torch.allclose(prob, logits.softmax(1).max(1).values)
