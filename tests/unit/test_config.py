"""Every option is declared once (rayseg.config.OPTIONS): each command's flags, help texts and checks come from there."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from rayseg import cli, config
from rayseg.cliutil import config_from
from rayseg.errors import UserError

COMMANDS = ("segment", "nightly", "evaluate", "train", "plan", "bench", "demo", "report", "synth", "doctor")


def flags_of(command: str) -> dict[str, argparse.Action]:
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions if a.dest not in ("help", "config")}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_a_shared_option_with_its_one_help_text(command):
    cls = config.COMMAND_CONFIGS[command]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flags = flags_of(command)
    for name, action in flags.items():
        assert name in config.OPTIONS, f"{command} --{name} is not declared in rayseg.config.OPTIONS"
        assert action.help.startswith(config.OPTIONS[name].help), f"{command} --{name}: help text differs from its declaration"
        if name in fields and fields[name].metadata.get("cli") is not False:
            assert action.choices == config.OPTIONS[name].meta.get("choices"), f"{command} --{name}: choices differ"
    # every field is a flag, except the ones a command takes as a positional argument of its own
    assert set(fields) - set(flags) <= {f for f, v in fields.items() if v.metadata.get("cli") is False}


def test_groups_are_shared_by_the_commands_that_run_the_predictor():
    for command in ("segment", "nightly", "evaluate"):
        names = {f.name for f in dataclasses.fields(config.COMMAND_CONFIGS[command])}
        assert set(config.PREDICT) <= names and set(config.POOL) <= names and set(config.CLUSTER) <= names
    assert {f.name for f in dataclasses.fields(config.PredictConfig)} == set(config.PREDICT)


def test_defaults_differ_by_command_where_declared():
    assert config.SegmentConfig(inputs=("x",), output="o").batch_size is None  # automatic
    assert config.EvalConfig(checkpoint="c", data=("d",)).batch_size == 16
    assert config.TrainConfig(data=("d",), val_data=("v",), output="o").batch_size is None  # planned from the data (rayseg.plan)
    assert config.BenchConfig().batch_size == 16


def test_help_says_what_an_automatic_default_is():
    help_text = flags_of("segment")["batch_size"].help
    assert "16 on CPU" in help_text and "power of two" in help_text
    assert "(default: 16)" in flags_of("evaluate")["batch_size"].help


@pytest.mark.parametrize("cls, kwargs, message", [
    (config.SegmentConfig, {"inputs": ("x",), "output": "o", "batch_size": 0}, "--batch-size must be at least 1"),
    (config.EvalConfig, {"checkpoint": "c", "data": ("d",), "batch_size": 0}, "--batch-size must be at least 1"),
    (config.SegmentConfig, {"inputs": ("x",), "output": "o", "overlap": 1.0}, "--overlap must be in [0, 1)"),
    (config.EvalConfig, {"checkpoint": "c", "data": ("d",), "actors": "3:1"}, "need 1 <= MIN <= MAX"),
    (config.SegmentConfig, {"inputs": ("x",), "output": "o", "threads": 0}, "--threads must be at least 1"),
    (config.TrainConfig, {"data": ("d",), "val_data": ("v",), "output": "o", "num_classes": 1}, "between 2 and 255"),
    (config.SegmentConfig, {"inputs": (), "output": "o"}, "at least one INPUT"),
    (config.NightlyConfig, {"inputs": ("x",), "output": "o", "overwrite": True}, "never clears its output"),
])
def test_one_check_per_option_for_every_command(cls, kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_from(cls, kwargs)


def test_predict_group_taken_from_a_command_config():
    cfg = config.SegmentConfig(inputs=("x",), output="o", tile=64, tta="flip", batch_size=4)
    opts = config.PredictConfig.of(cfg)
    assert (opts.tile, opts.tta, opts.batch_size, opts.device) == (64, "flip", 4, "auto")


def test_public_config_redacts_credentials():
    cfg = config.SegmentConfig(inputs=("x",), output="o", storage_options={"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://h"})
    public = config.public_config(cfg)
    assert "s3cr3t" not in str(public) and public["storage_options"]["endpoint_url"] == "http://h"
