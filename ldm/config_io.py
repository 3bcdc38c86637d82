"""Configs as data: YAML files with `base:` inheritance, `key=value` overrides, the configs shipped
by name, and plain data <-> typed dataclasses (every key and type checked).

Nothing here knows the project's config classes (`ldm.config` does); these are the generic pieces.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ConfigError


def config_dir() -> Path:
    """The folder of the shipped configs: `ldm/configs/` in an installed wheel, the repository's
    `configs/` in a source checkout (an editable install)."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def resolve_config(name: str | Path) -> Path:
    """A config path, or the name of a shipped config ("sd15" or "sd15.yaml" -> configs/sd15.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    folder = config_dir()
    if path.name == str(name):  # a bare name, not a path into some folder
        for candidate in (folder / f"{name}.yaml", folder / str(name)):
            if candidate.is_file():
                return candidate
    known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise ConfigError(f"config {str(name)!r} not found: pass a YAML path or one of the names in configs/ ({known})")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config, resolving `base:` chains (paths relative to the including file)."""
    path = Path(path)
    return _load_yaml(path, seen=())


def _load_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"config `base:` chain loops: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level (got {type(data).__name__})")
    base = data.pop("base", None)
    if base is None:
        return data
    return merge(_load_yaml(path.parent / base, (*seen, resolved)), data)


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge: mappings merge, everything else in `override` replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply command-line `a.b.c=value` overrides; values are parsed as YAML (`3`, `true`, `[1,2]`)."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. model.unet.model_channels=64")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        patch: Any = value
        for part in reversed(key.strip().split(".")):
            patch = {part: patch}
        data = merge(data, patch)
    return data


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking every key and type."""
    return _convert(cls, data, where or cls.__name__)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain data (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (got {value!r})")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        unknown = [k for k in value if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {where}.{key}{hint}")
        kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list (got {value!r})")
        (item, *rest) = typing.get_args(tp)
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string (got {value!r})")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config type {tp} at {where} is not supported")


def shipped_configs_writing(path: str | Path) -> list[str]:
    """Commands that write the model or VAE file `path` (`<output_dir>/model.safetensors` or
    `vae.safetensors`) from a shipped config: the stage-2 run that trains it, or whose stage 1 does,
    before a VAE config's own run. Empty for any other file."""
    path = Path(path)
    stage2, stage1 = [], []
    for config in sorted(config_dir().glob("*.yaml")):
        try:
            train = load_yaml(config).get("train") or {}
        except ConfigError:
            continue
        made_here = Path(str(train.get("output_dir", ""))) == path.parent
        if path.name == "model.safetensors" and made_here:
            stage2.append(f"python tools/train_ldm.py configs/{config.name}")
        elif path.name == "vae.safetensors":
            if Path(str(train.get("vae_checkpoint", ""))) == path:
                stage2.append(f"python tools/train_ldm.py configs/{config.name}")
            elif made_here:
                stage1.append(f"python tools/train_vae.py configs/{config.name}")
    return stage2 + stage1


def missing_start(path: str, config: str = "") -> str:
    """The error for a run's starting model `path` (`train.init_from`, of `config` when it is not the
    run's own) that does not exist, with the command that makes it where a shipped config does."""
    key = f"train.init_from of {config}" if config else "train.init_from"
    makers = shipped_configs_writing(path)
    fix = (f"train that first ({' or '.join(f'`{m}`' for m in makers[:2])} writes it), or point {key} at "
           "another file") if makers else f"check the path, or point {key} at an existing model file or folder"
    return f"{key}: {path} not found: {fix}"


def require_start(path: str, config: str = "") -> None:
    """Refuse a run's starting model `path` (`train.init_from`, of `config`; empty: none) that does
    not exist, before any work, with `missing_start`'s error."""
    if path and not Path(path).exists():
        raise ValueError(missing_start(path, config))
