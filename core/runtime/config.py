"""Typed configs: a dataclass schema per application, YAML presets, a config file and ``--set`` overrides.

Resolution order (later wins): schema defaults → preset YAML → ``--config FILE`` → ``--set key=value``.
OmegaConf structured configs do the typing; every failure becomes a one-line :class:`UserError`
naming the offending key and what is allowed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from core.runtime.errors import UserError

T = TypeVar("T")


def _valid_keys(schema: Any, dotted: str) -> list[str]:
    """The keys allowed at the level of ``dotted`` in a dataclass schema."""
    node = schema
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            break
        node = fields[part].type if isinstance(fields[part].type, type) else getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            default = fields[part].default_factory  # type: ignore[misc]
            node = default() if callable(default) else None
    if node is None or not dataclasses.is_dataclass(node):
        return []
    return [f.name for f in dataclasses.fields(node)]


def _explain(exc: Exception, schema: type, source: str) -> UserError:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        valid = _valid_keys(schema, key)
        allowed = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return UserError(f"unknown config key '{key}' in {source}{allowed}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return UserError(f"bad value for config key '{key}' in {source}: {msg}")
    return UserError(f"invalid config in {source}: {str(exc).splitlines()[0]}")


def _load_yaml(path: Path, what: str):
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:
        raise UserError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}")
    if not hasattr(loaded, "keys"):
        raise UserError(f"{what} {path} must be a YAML mapping of config keys")
    return loaded


def available_presets(preset_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(preset_dir).glob("*.yaml"))


def build_config(schema: type[T], *, preset_dir: Path | None = None, preset: str | None = None,
                 config_file: str | None = None, overrides: Sequence[str] = (),
                 base: dict[str, Any] | None = None) -> T:
    """Resolve a config of type ``schema`` from its presets, an optional file and dotted overrides.

    ``base`` (e.g. the config stored in a checkpoint) is applied first, in place of a preset.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    defaults = OmegaConf.structured(schema)
    layers: list[tuple[Any, str]] = []
    if base is not None:
        layers.append((OmegaConf.create(base), "checkpoint config"))
    if preset is not None:
        names = available_presets(preset_dir) if preset_dir else []
        if preset not in names:
            raise UserError(f"unknown preset '{preset}'; available presets: {', '.join(names) or 'none'}")
        layers.append((_load_yaml(Path(preset_dir) / f"{preset}.yaml", "preset"), f"preset '{preset}'"))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        layers.append((_load_yaml(path, "config file"), f"config file {path}"))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"bad --set '{item}': expected key=value, e.g. --set optim.lr=0.01")
    if overrides:
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "--set"))
        except OmegaConfBaseException as exc:
            raise UserError(f"bad --set override: {str(exc).splitlines()[0]}")
    cfg = defaults
    for layer, source in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, source) from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, "config") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.1, ...}`` from a (nested) dataclass or mapping."""
    items = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    out: dict[str, Any] = {}
    for key, value in items.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise UserError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
