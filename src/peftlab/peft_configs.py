"""peft's config classes by name (`method.kind: peft`, `method.config: VeraConfig`), and a check of
the options given for one. Kept apart from methods.py so that config validation can use it."""

from __future__ import annotations

import dataclasses
from typing import Any


def peft_config_class(name: str):
    """A peft config class by class name (`VeraConfig`) or method name (`vera`)."""
    import peft

    candidates = {n: getattr(peft, n) for n in dir(peft) if n.endswith("Config")}
    classes = {n: c for n, c in candidates.items()
               if isinstance(c, type) and issubclass(c, peft.PeftConfig) and c is not peft.PeftConfig}
    by_lower = {n.lower(): c for n, c in classes.items()} | {n[: -len("Config")].lower(): c for n, c in classes.items()}
    found = classes.get(name) or by_lower.get(name.lower())
    if found is None:
        raise ValueError(f"peft has no config {name!r}; available: {', '.join(sorted(classes))}")
    return found


def check_peft_options(name: str, options: dict[str, Any]) -> None:
    cls = peft_config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method.options {unknown} are not fields of {cls.__name__} "
                         f"(fields: {', '.join(sorted(fields - {'peft_type', 'task_type'}))})")
    if "task_type" in options:
        raise ValueError("method.options.task_type is set by peftlab (sequence classification)")
