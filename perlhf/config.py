"""Configs are dataclasses; this module makes every field a CLI flag and a YAML key.

Precedence: dataclass default < YAML file (--config) < flag given on the command line.
A field's help text is its `metadata["help"]`. Validation lives in each config's `validate()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is out of range; the message names the flag."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        scalar, is_list = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if scalar is bool:
            parser.add_argument(flag(f.name), nargs="?", const=True, type=_parse_bool, **kwargs)
            parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false", dest=f.name,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif is_list:
            parser.add_argument(flag(f.name), nargs="+", type=scalar, **kwargs)
        elif scalar is dict:
            parser.add_argument(flag(f.name), nargs="+", metavar="KEY=VALUE", type=_key_value, **kwargs)
        else:
            parser.add_argument(flag(f.name), type=scalar, **kwargs)
    parser.add_argument("--config", dest="config", default=None, help="YAML file with any of these options")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(cls: type[T], args: argparse.Namespace | None = None, **overrides: Any) -> T:
    """Make a config from defaults, then the YAML file named by args.config, then flags, then overrides."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    yaml_path = getattr(args, "config", None) if args is not None else None
    if yaml_path:
        loaded = load_yaml(yaml_path)
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ConfigError(f"--config {yaml_path}: unknown option(s) {', '.join(unknown)}")
        values.update({key: _coerce(cls, key, value, yaml_path) for key, value in loaded.items()})
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names})
    values.update(overrides)
    for key, value in list(values.items()):
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            values[key] = dict(value)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def check(condition: bool, name: str, message: str) -> None:
    """Raise ConfigError naming the flag when a condition on a config value fails."""
    if not condition:
        raise ConfigError(f"{flag(name)}: {message}")


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_dtype(value: str | None) -> None:
    check(value is None or value in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)} (got {value!r})")


QUANTIZE_HELP = "load the frozen backbone quantized through bitsandbytes: 4bit (NF4, double quantization) or 8bit"


def check_quantize(value: str | None, full: bool = False) -> None:
    check(value in (None, "4bit", "8bit"), "quantize", f"must be 4bit or 8bit (got {value!r})")
    check(not (value and full), "quantize", "trains LoRA adapters over a frozen quantized base; --full trains "
          "every weight, which a quantized base cannot hold: drop one of them")


FSDP_HELP = ("shard the frozen backbone over the processes with FSDP2 (under torchrun or accelerate launch); "
             "adapters, heads and optimizer state stay whole on every process")


def check_fsdp(fsdp: bool, full: bool, quantize: str | None) -> None:
    check(not (fsdp and full), "fsdp", "shards the frozen base of a LoRA run; --full trains every weight, which "
          "perlhf does not shard: drop --fsdp (data parallelism without it keeps a whole copy per process)")
    check(not (fsdp and quantize), "fsdp", "shards an unquantized base; a --quantize base is already 4-8x smaller "
          "and is not sharded by perlhf: drop one of them")


def check_scheduler(value: str) -> None:
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    check(value in names, "lr_scheduler_type", f"must be one of {', '.join(names)} (got {value!r})")


def _coerce(cls: type, name: str, value: Any, path: str) -> Any:
    """A YAML value converted to the field's type, as the flag's argparse type would; ConfigError if it cannot be."""
    annotation = typing.get_type_hints(cls)[name]
    scalar, is_list = _base_type(annotation)
    optional = type(None) in typing.get_args(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"--config {path}: {name}: a value is required")

    def one(item: Any) -> Any:
        if scalar is bool:
            return item if isinstance(item, bool) else _parse_bool(str(item))
        if scalar is int:
            if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                raise ValueError
            return int(item)
        if scalar is float:
            if isinstance(item, bool):
                raise ValueError
            return float(item)
        if scalar is dict:
            if not isinstance(item, dict):
                raise ValueError
            return {str(k): str(v) for k, v in item.items()}
        if isinstance(item, (dict, list)):
            raise ValueError
        return str(item)

    try:
        if is_list:
            return [one(item) for item in (value if isinstance(value, list) else [value])]
        return one(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        kind = "a mapping" if scalar is dict else f"{'a list of ' if is_list else ''}{scalar.__name__}"
        raise ConfigError(f"--config {path}: {name}: expected {kind}, got {value!r}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
