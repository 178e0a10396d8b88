"""Build argparse options from frozen config dataclasses, so a flag, a YAML key and a field share one name.

A field `batch_size` is the flag `--batch-size` and the YAML key `batch_size` (`batch-size` is accepted too).
Field metadata (from rayseg.config.OPTIONS): `help`, `positional` (a tuple takes nargs="+"), `choices`, `short`, `cli` (False: no
flag), `auto` (what a default of None means).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from rayseg.errors import UserError


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None` / Optional[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of `cls`. Defaults are left as SUPPRESS so a YAML file can fill gaps."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, _ = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if default not in (None, (), {}, False, "") and kwargs["help"]:
            kwargs["help"] += f" (default: {default})"
        elif default is None and "auto" in f.metadata:
            kwargs["help"] += f" (default: {f.metadata['auto']})"
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        origin = typing.get_origin(tp)
        if f.metadata.get("positional"):
            if origin is tuple:
                kwargs["nargs"] = "*" if f.metadata.get("optional") else "+"
            parser.add_argument(f.name, metavar="OUT" if f.name in ("out", "output") else f.name.upper(), **kwargs)
            continue
        names = [f"--{f.name.replace('_', '-')}"] + ([f.metadata["short"]] if "short" in f.metadata else [])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kwargs["nargs"] = "+"
            inner = typing.get_args(tp)[0]
            kwargs["type"] = inner if inner in (int, float) else str
        elif tp is dict or origin is dict:
            kwargs["type"] = _json_dict
            kwargs["metavar"] = "JSON"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        parser.add_argument(*names, **kwargs)


def load_yaml_config(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def config_from(cls: type, values: dict) -> Any:
    """Build `cls` from a dict of field values, checking names and coercing list -> tuple."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        tp, optional = _base_type(hints[name])
        if value is None and optional:
            kwargs[name] = None
            continue
        if typing.get_origin(tp) is tuple:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif tp is dict or typing.get_origin(tp) is dict:
            value = _json_dict(value) if isinstance(value, str) else value
        elif tp in (int, float) and not isinstance(value, bool):
            try:
                value = tp(value)
            except (TypeError, ValueError):
                raise UserError(f"option {name} must be a number, got {value!r}") from None
        kwargs[name] = value
    missing = [f.name for f in known.values() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]  # type: ignore[misc]
    if missing:
        raise UserError(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**kwargs)


def config_from_args(cls: type, ns: argparse.Namespace, config_file: str | None = None) -> Any:
    """Fields from an optional YAML file, overridden by flags given on the command line."""
    values = load_yaml_config(config_file) if config_file else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    return config_from(cls, values)


def add_command(sub, name: str, cls: type, run, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of `cls`, plus `--config FILE.yaml`; `run(config) -> exit code`."""
    p = sub.add_parser(name, help=help, description=description)
    add_config_arguments(p, cls)
    p.add_argument("--config", help="YAML file of options (same names as the flags); flags override it")
    p.set_defaults(func=lambda args: run(config_from_args(cls, args, args.config)))
    return p


def print_summary(summary: dict, omit: tuple[str, ...] = ("config",)) -> int:
    """The summary as one JSON line on stdout (jobs read it as their last line); the long parts left out."""
    print(json.dumps({k: v for k, v in summary.items() if k not in omit}, default=str))
    return 0
