"""The base of every typed config in peftlab (run, study, search, server settings)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys fail; assignments are validated too."""

    # use_attribute_docstrings: the string below each field becomes its `description`, which
    # scripts/config_docs.py renders into docs/config.md and `peftlab serve --help` shows.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
