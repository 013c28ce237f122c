"""Reading a run config: YAML (with `2e-4` read as a number), dotted `key=value` overrides, every
problem collected into one error; and comparing a saved config with today's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from peftlab.config import SPEED_SWITCHES, RunConfig
from peftlab.errors import ConfigError
from peftlab.method_configs import METHOD_CLASSES, LoraMethod


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-4` as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["method.r=16", "train.epochs=5"]` -> `{"method.r": 16, ...}`; values parse as YAML."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} is not of the form section.key=value")
        parsed[key] = parse_yaml(raw) if raw.strip() else None
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); validation happens afterwards."""
    result = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"override {dotted}: {part} is not a section")
                node[part] = child
            node = child
        node[leaf] = value
    return result


METHOD_KEYS = set().union(*(cls.model_fields for cls in METHOD_CLASSES.values()))


def drop_inapplicable_method_keys(raw: dict[str, Any]) -> set[str]:
    """`method.r` means nothing for full fine-tuning: drop keys of other method kinds (unknown keys stay,
    so that typos still fail validation)."""
    method = raw.get("method")
    if not isinstance(method, dict):
        return set()
    allowed = METHOD_CLASSES.get(method.get("kind", "lora"))
    if allowed is None:
        return set()
    dropped = {key for key in method if key in METHOD_KEYS and key not in allowed.model_fields}
    for key in dropped:
        del method[key]
    return dropped


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def migrate_saved(raw: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier peftlab, read with today's keys: the speed switches that were in
    `train` are in `speed` now. For saved run configs only; a user's config with an old key fails."""
    train = raw.get("train")
    if not isinstance(train, dict) or not any(key in train for key in SPEED_SWITCHES):
        return raw
    raw = _deep_copy(raw)
    moved = {key: raw["train"].pop(key) for key in SPEED_SWITCHES if key in raw["train"]}
    raw["speed"] = {**moved, **(raw.get("speed") or {})}
    return raw


def validate_config(raw: dict[str, Any], origin: str = "config") -> RunConfig:
    """Validate a raw dict, collecting every problem into one ConfigError."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(err, raw) for err in exc.errors()]
        raise ConfigError(f"{origin}: {len(lines)} problem(s)\n  " + "\n  ".join(lines)) from None


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    raw = apply_overrides(read_yaml(Path(path)), parse_overrides(overrides or []))
    return validate_config(raw, origin=str(path))


NOT_EXPERIMENT_KEYS = frozenset({"output.overwrite", "output.progress", "output.cache_dir", "output.report_to"})


def config_differences(saved: dict[str, Any], expected: dict[str, Any], ignore=NOT_EXPERIMENT_KEYS,
                       prefix: str = "") -> list[str]:
    """`train.lr: 0.005 there, 0.001 here` for every dotted key whose value differs. A saved config
    is read with today's defaults first, so that keys added since it was written do not count."""
    if not prefix:
        saved = with_defaults(migrate_saved(saved))
    out = []
    for key in sorted(set(saved) | set(expected)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        a, b = saved.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, ignore, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} there, {b!r} here")
    return out


def with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return RunConfig.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return raw  # then the differences name what no longer validates


def _describe_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    # Discriminated unions put the tag into the location ("method.lora.r"): drop it.
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHOD_CLASSES:
        loc.pop(1)
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "train" and loc[1] in SPEED_SWITCHES:
        return f"{key}: moved to speed.{loc[1]}"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_fields_at(loc[:-1], raw)))
        return f"{key}: unknown key (allowed here: {allowed})"
    if err["type"] == "union_tag_invalid":
        return f"{key}: unknown method kind {err['input'].get('kind')!r} (allowed: {', '.join(METHOD_CLASSES)})"
    if err["type"] == "union_tag_not_found":
        return f"{key}: missing `kind` (one of: {', '.join(METHOD_CLASSES)})"
    message = err["msg"].removeprefix("Value error, ")
    shown = "" if err["type"] in ("missing", "value_error") else f" (got {err.get('input')!r})"
    return f"{key}: {message}{shown}"


def _fields_at(section: list[str], raw: dict[str, Any]) -> list[str]:
    if not section:
        return list(RunConfig.model_fields)
    head = section[0]
    if head == "method":
        kind = (raw.get("method") or {}).get("kind", "lora")
        cls = METHOD_CLASSES.get(kind, LoraMethod)
    else:
        cls = RunConfig.model_fields[head].annotation
    return list(cls.model_fields)  # type: ignore[union-attr]
