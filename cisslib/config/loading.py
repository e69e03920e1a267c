"""Loading the config: defaults <- YAML file <- preset <- ``--set`` overrides, type-checked.

Unknown keys and wrong types are errors naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cisslib.config.presets import PRESETS
from cisslib.config.tree import Config, ConfigError
from cisslib.config.validation import validate
from cisslib.files import atomic_write_text


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{where}: key '{key}' must be a list of {_type_name(item)}, got {value!r}"
            )
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: key '{key}' has an unsupported type {tp!r}")  # pragma: no cover


#: String keys with an ``off`` value that YAML 1.1 reads as the boolean false.
OFF_WORDS = ("scenario.validate",)


def _merge(node: Any, data: dict, prefix: str, where: str) -> None:
    """Merge a nested dict into a dataclass instance in place, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = _hints(type(node))
    names = {f.name for f in dataclasses.fields(node)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            near = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key '{full}' (valid keys here: {near})")
        current = getattr(node, key)
        if value is False and full in OFF_WORDS:
            value = "off"  # `validate: off` is YAML false; the documented spelling means "off"
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.", where)
        else:
            setattr(node, key, _coerce(value, hints[key], full, where))


def set_key(cfg: Config, dotted: str, value: Any, where: str = "--set") -> None:
    """Set one dotted key (``train.base.lr``) with type checking."""
    parts = dotted.split(".")
    data: Any = value
    for part in reversed(parts):
        data = {part: data}
    _merge(cfg, data, "", where)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set: '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set: '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string; accept it as a number
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            pass
    return key, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- preset <- ``--set`` overrides; validated.

    Args:
        path: a params YAML file (``None``: defaults only).
        overrides: strings ``key.sub=value``.
    """
    cfg = Config()
    parsed = [parse_override(o) for o in overrides]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file {path} does not exist; list examples with `ls params/`")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            at = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}{at}: not valid YAML: {getattr(e, 'problem', e)}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"params file {path} cannot be read ({e}); pass a YAML file"
            ) from None
        if data is None:
            raise ConfigError(
                f"{path}: the params file is empty (or only comments); it would run the defaults "
                "(25000 iterations of a random ViT-B/16): write the scenario's keys, e.g. copy "
                "params/smoke.yaml"
            )
        _merge(cfg, data, "", str(path))
    preset = cfg.run.preset
    for key, value in parsed:
        if key == "run.preset":
            preset = value
    if preset not in PRESETS:
        raise ConfigError(f"run.preset is {preset!r}; available presets: {', '.join(PRESETS)}")
    for key, value in PRESETS[preset].items():
        set_key(cfg, key, value, where=f"preset {preset}")
    for key, value in parsed:
        set_key(cfg, key, value)
    validate(cfg, str(path) if path is not None else "config")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, where: str = "config") -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. the one saved in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data, "", where)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, dump_yaml(cfg))
