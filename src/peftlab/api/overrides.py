"""Keyword overrides of the Python API, as the command line's `section.key=value`."""

from __future__ import annotations

from typing import Any


def flat_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """`data={"n_train": 500}` and `**{"train.lr": 1e-3}` alike -> `{"data.n_train": 500, "train.lr": 1e-3}`.
    A section given as a dict changes only the keys it names, as on the command line."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            flat |= {f"{key}.{inner}": v for inner, v in flat_overrides(value).items()}
        else:
            flat[key] = value
    return flat
