"""The model as the predictor runs it (batch norm folded into the convolutions, same outputs, original untouched),
its weights as a checkpoint stores them, and the input normalisation its card describes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayseg.models import (IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_FILE, ModelCard, build_model, fold_batch_norm, for_inference,
                           load_bundle, save_checkpoint, state_dict_bytes)


def _with_real_statistics(model: nn.Module) -> nn.Module:
    """Fresh BatchNorms are the identity (mean 0, var 1, weight 1, bias 0); give them values a trained model has."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# unet: not traceable by torch.fx (pads by input size), folded through its nn.Sequential blocks;
# the torchvision models go through torch.fx
@pytest.mark.parametrize("architecture", ["unet", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_folding_keeps_the_outputs_and_removes_every_batch_norm(architecture):
    torch.manual_seed(0)
    model = _with_real_statistics(build_model(architecture, 3))
    before = batch_norms(model)
    folded = fold_batch_norm(model)
    assert before > 0 and batch_norms(folded) == 0
    assert batch_norms(model) == before  # the caller's model is not changed
    x = torch.randn(2, 3, 72, 88)  # not the size anything was built for: the folded model is not tied to one shape
    with torch.inference_mode():
        want, got = model(x), folded(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.999


def test_for_inference_is_channels_last_and_eval():
    model = for_inference(build_model("pointwise", 2).train(), torch.device("cpu"))
    assert not model.training
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert model(x).shape == (1, 2, 8, 8)


def test_state_dict_bytes_is_the_checkpoint_weights_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("pointwise", 3)
    data = state_dict_bytes(model)
    save_checkpoint(model, ModelCard("pointwise", 3), str(tmp_path))
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == data
    bundle = load_bundle(str(tmp_path))
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(bundle.build()(x), model.eval()(x), rtol=0, atol=0)


def test_pixel_mean_std_normalises_uint8_values_like_the_card_says():
    card = ModelCard("pointwise", 2)
    mean, std = card.pixel_mean_std(torch.device("cpu"))
    assert mean.shape == std.shape == (1, 3, 1, 1)
    x = torch.randint(0, 256, (2, 3, 4, 5)).float()
    want = (x / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close((x - mean) / std, want)


@pytest.mark.parametrize("architecture, channels", [("unet", 1), ("unet", 5), ("pointwise", 12),
                                                     ("lraspp_mobilenet_v3_large", 4), ("deeplabv3_mobilenet_v3_large", 1)])
def test_models_are_built_for_any_channel_count(architecture, channels):
    torch.manual_seed(0)
    model = build_model(architecture, 2, in_channels=channels).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, channels, 64, 64)).shape == (1, 2, 64, 64)


def test_a_widened_first_convolution_keeps_the_rgb_filters():
    from rayseg.models import _set_in_channels

    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 2).model
    rgb = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)).weight.detach().clone()
    _set_in_channels(model, 5)
    wide = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)).weight
    assert wide.shape[1] == 5 and torch.equal(wide[:, :3], rgb) and torch.allclose(wide[:, 4], rgb.mean(1))


def test_card_carries_channels_and_normalisation_and_a_card_from_before_still_loads(tmp_path):
    import json

    import numpy as np

    from rayseg.config import PredictConfig
    from rayseg.decode import ragged_column, to_uint8
    from rayseg.predict import Predictor

    torch.manual_seed(0)
    record = {"mode": "percentile", "spec": "percentile:1:99.8", "low": 1.0, "high": 99.8}
    save_checkpoint(build_model("unet", 2, in_channels=1), ModelCard("unet", 2, in_channels=1, mean=(0.449,), std=(0.226,), intensity=record),
                    str(tmp_path / "new"))
    card = json.loads((tmp_path / "new" / "model.json").read_text())
    assert card["in_channels"] == 1 and card["intensity"] == record
    assert load_bundle(str(tmp_path / "new")).card.normalisation() == "percentile:1:99.8"

    # a checkpoint written before channels and normalisation were recorded: its model.json lacks both
    save_checkpoint(build_model("pointwise", 2), ModelCard("pointwise", 2), str(tmp_path / "old"))
    old = json.loads((tmp_path / "old" / "model.json").read_text())
    for key in ("in_channels", "intensity"):
        old.pop(key)
    (tmp_path / "old" / "model.json").write_text(json.dumps(old))
    bundle = load_bundle(str(tmp_path / "old"))
    assert bundle.card.in_channels == 3 and bundle.card.intensity is None and bundle.card.normalisation() == "legacy"
    # and it segments a 16-bit grey image exactly as before: divided by 257 and repeated to RGB
    img = np.random.default_rng(0).integers(0, 65535, (32, 32, 1)).astype(np.uint16)
    as_before = np.repeat(to_uint8(img), 3, axis=2)
    predictor = Predictor(bundle, PredictConfig(batch_size=2, device="cpu"))
    batch = lambda im: {"image_id": np.array(["a"], dtype=object), "image": ragged_column([im]), "error": np.array([None], dtype=object)}  # noqa: E731
    assert np.array_equal(predictor(batch(img))["mask"][0], predictor(batch(as_before))["mask"][0])
