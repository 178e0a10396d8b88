"""The nightly key is derived from config.OPTIONS: every option that can change a row says so, once."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from rayseg import config, models
from rayseg.config import BY_MODEL, KEYED, OPTIONS, SAME, NightlyConfig
from rayseg.errors import UserError
from rayseg.nightly import FIRST_KEY, keyed_options, output_key

BASE = {"inputs": ("in",), "output": "out", "model": "pointwise"}


@pytest.fixture(scope="module")
def bundle():
    return models.load_bundle(None, "pointwise", 2)


def test_every_option_that_reaches_a_row_says_whether_it_changes_it():
    for group in (config.MODEL, config.READ, config.PREDICT, config.OUTPUT):
        for name in group:
            assert OPTIONS[name].rows in (KEYED, SAME, BY_MODEL), (
                f"config.OPTIONS[{name!r}] does not say whether it changes an output row: give it rows=KEYED, SAME or BY_MODEL")


def test_intensity_and_the_first_keys_options_are_keyed():
    keyed = set(keyed_options())
    assert "intensity" in keyed and set(FIRST_KEY) <= keyed
    assert not keyed & {"batch_size", "compile", "actors", "threads", "output", "inputs", "commit_seconds", "lease_seconds"}


def other_value(name: str):
    """A valid value of option `name` other than nightly's default."""
    default = {f.name: f.default for f in dataclasses.fields(NightlyConfig)}[name]
    if isinstance(default, bool):
        candidates = [not default]
    elif isinstance(default, str):
        candidates = [*OPTIONS[name].meta.get("choices", ()), "fixed:0:100", "other"]
    else:  # numbers, and None for an automatic default
        candidates = [64, 0.5]
    for value in candidates:
        if value == default:
            continue
        try:
            NightlyConfig(**BASE, **{name: value})
        except UserError:
            continue
        return value
    raise AssertionError(f"no other valid value found for {name}")


@pytest.mark.parametrize("name", keyed_options())
def test_a_keyed_option_changes_the_key(name, bundle):
    base = output_key(NightlyConfig(**BASE), bundle)
    assert output_key(NightlyConfig(**BASE, **{name: other_value(name)}), bundle) != base


@pytest.mark.parametrize("name", ["batch_size", "compile", "actors", "threads", "output", "commit_mb", "lease_wait"])
def test_an_option_that_changes_no_row_keeps_the_key(name, bundle):
    value = {"batch_size": 4, "compile": True, "actors": "2", "threads": 2, "output": "elsewhere", "commit_mb": 1, "lease_wait": 5.0}[name]
    assert output_key(NightlyConfig(**{**BASE, name: value}), bundle) == output_key(NightlyConfig(**BASE), bundle)


def test_a_fresh_models_architecture_and_classes_change_the_key(bundle):
    key = output_key(NightlyConfig(**BASE), bundle)
    assert output_key(NightlyConfig(**{**BASE, "num_classes": 3}), models.load_bundle(None, "pointwise", 3)) != key
    assert output_key(NightlyConfig(**{**BASE, "model": "unet"}), models.load_bundle(None, "unet", 2)) != key


def test_keys_of_existing_manifests_stay_valid(tmp_path):
    """With a checkpoint and the new options at their defaults, the key is the one earlier releases wrote."""
    ckpt = str(tmp_path / "ckpt")
    models.save_checkpoint(models.UNet(2), models.ModelCard("unet", 2, input_size=32), ckpt)
    bundle = models.load_bundle(ckpt)
    cfg = NightlyConfig(**{**BASE, "checkpoint": ckpt, "input_size": 32, "mask_format": "rle"})
    earlier = {"model_digest": bundle.digest, **{k: getattr(cfg, k) for k in FIRST_KEY}}
    assert output_key(cfg, bundle) == hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()[:16]
    assert output_key(dataclasses.replace(cfg, intensity="none"), bundle) != output_key(cfg, bundle)
