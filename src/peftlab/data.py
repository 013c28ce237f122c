"""Load, validate, split, tokenise and batch labelled text."""

from __future__ import annotations

import codecs
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from peftlab.assets import DATASET_ALIASES
from peftlab.config import DataConfig
from peftlab.errors import DataError
from peftlab.offline_data import CONVERTED_ALIASES
from peftlab.tasks import parse_multi_label, parse_number

# --------------------------------------------------------------------------- raw tables


@dataclass
class Table:
    """Rows of one split, with where they came from so errors can point at them."""

    origin: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]
    rows: np.ndarray  # 1-based row number in the origin (header excluded)

    def take(self, index: np.ndarray) -> "Table":
        return Table(
            origin=self.origin,
            texts=[self.texts[i] for i in index],
            pairs=None if self.pairs is None else [self.pairs[i] for i in index],
            labels=[self.labels[i] for i in index],
            rows=self.rows[index],
        )

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Columns:
    text: str
    pair: str | None
    label: str
    encoding: str
    task: str = "single_label"
    separator: str = ","


def reading_encoding(encoding: str, option: str = "data.encoding") -> str:
    """The codec to read with: utf-8 as utf-8-sig, which drops the byte-order mark that Excel and
    Notepad put first (it would otherwise stick to the first column name or break the first JSON line)."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"{option} {encoding!r} is not a known text encoding") from None
    return "utf-8-sig" if name == "utf-8" else encoding


def text_lines(handle) -> Iterator[str]:
    """Lines of a text handle opened without newline translation (newline=LF), less their LF or CR LF.
    Unlike str.splitlines() this never breaks at U+2028, U+2029 or U+0085, which JSON strings may hold."""
    for line in handle:
        if line.endswith("\n"):
            line = line[:-1]
        yield line[:-1] if line.endswith("\r") else line


def jsonl_records(path: Path, encoding: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line, streamed. Undecodable bytes raise UnicodeDecodeError:
    callers turn it into `undecodable_error`."""
    with open(path, encoding=reading_encoding(encoding), newline="\n") as handle:
        for number, line in enumerate(text_lines(handle), start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None


def delimited_options(suffix: str) -> dict[str, Any]:
    """pandas.read_csv options for .csv / .tsv. TSV has no quoting: a text that starts with `"`
    is text, not the start of a quoted field that would swallow the rows after it."""
    if suffix == ".tsv":
        return {"sep": "\t", "quoting": csv.QUOTE_NONE}
    return {"sep": ",", "quoting": csv.QUOTE_MINIMAL}


def undecodable_error(path: Path, encoding: str, hint: str = "set data.encoding to the file's encoding "
                      "(e.g. data.encoding=latin-1)") -> DataError:
    """The error for a file that is not valid `encoding`, naming the line of the first bad byte.
    Only this error path decodes the file again, streamed, to find that line."""
    codec = reading_encoding(encoding)
    decoder = codecs.getincrementaldecoder(codec)()
    line = 1
    with open(path, "rb") as handle:
        try:
            for block in iter(lambda: handle.read(1 << 20), b""):
                line += decoder.decode(block).count("\n")
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            line += codecs.decode(exc.object[: exc.start], codec, "replace").count("\n")
            return DataError(f"{path}: line {line}: byte {exc.object[exc.start]:#04x} is not valid {encoding}; {hint}")
    return DataError(f"{path}: not valid {encoding}; {hint}")


def read_file(path: Path, encoding: str) -> pd.DataFrame:
    """Read a csv / tsv / jsonl / parquet file from its path (never whole into memory as bytes or text);
    undecodable bytes and bad lines are named by line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl or .parquet)")
    codec = reading_encoding(encoding)
    try:
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, suffix, codec)
        return _read_jsonl(path, encoding)
    except UnicodeDecodeError:
        raise undecodable_error(path, encoding) from None


def _read_delimited(path: Path, suffix: str, codec: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""], encoding=codec,
                           **delimited_options(suffix))
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not valid CSV: {exc}") from None


def _read_jsonl(path: Path, encoding: str) -> pd.DataFrame:
    records = []
    for number, record in jsonl_records(path, encoding):
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: not a JSON object")
        records.append(record)
    # object columns keep the parsed values as they are: no copy of the texts, no int-to-float promotion
    return pd.DataFrame(records, dtype=object)


def _table_from_frame(frame: pd.DataFrame, columns: Columns, origin: str,
                      label_names: list[str] | None = None) -> Table:
    wanted = [c for c in (columns.text, columns.pair, columns.label) if c is not None]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(
            f"{origin}: no column {', '.join(map(repr, missing))}; the columns are: "
            f"{', '.join(map(str, frame.columns))} (set data.text_column / data.label_column)"
        )
    rows = np.arange(1, len(frame) + 1)
    texts = _checked_texts(frame[columns.text].tolist(), origin, columns.text, rows)
    pairs = None
    if columns.pair is not None:
        pairs = _checked_texts(frame[columns.pair].tolist(), origin, columns.pair, rows)
    labels = frame[columns.label].tolist()
    if label_names is not None:  # hub ClassLabel: integers that stand for names
        labels = [_class_label_name(v, label_names, origin, columns.label, row) for v, row in zip(labels, rows)]
    labels = [_checked_label(v, origin, columns, row) for v, row in zip(labels, rows)]
    return Table(origin=origin, texts=texts, pairs=pairs, labels=labels, rows=rows)


def _class_label_name(value: Any, names: list[str], origin: str, column: str, row: int) -> Any:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        return value
    if not 0 <= value < len(names):  # the hub marks unlabelled rows (test splits) with -1
        raise DataError(f"{origin}: row {row}, column {column!r}: label {value} is not one of the dataset's "
                        f"{len(names)} classes (unlabelled rows must be removed)")
    return names[value]


def text_problem(value: Any) -> str | None:
    """Why `value` cannot be classified ("missing", "empty", "not text (…)"), or None when it can."""
    if isinstance(value, str):
        return None if value.strip() else "empty"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing"
    return f"not text ({type(value).__name__} {value!r})"


def _checked_texts(values: list[Any], origin: str, column: str, rows: np.ndarray) -> list[str]:
    for value, row in zip(values, rows):
        if (what := text_problem(value)) is not None:
            raise DataError(f"{origin}: row {row}, column {column!r}: text is {what}")
    return values


# Class ids are written one way only, so "007" and "7" (or "+7", "7.0") stay distinct names.
_CLASS_ID = re.compile(r"0|[1-9][0-9]*")


def _checked_label(value: Any, origin: str, columns: Columns, row: int) -> Any:
    """A label cell as the task reads it: a class name (or id), a list of names, or a number."""
    where = f"{origin}: row {row}, column {columns.label!r}"
    try:
        if columns.task == "multi_label":
            return parse_multi_label(value, columns.separator, where)
        if columns.task == "regression":
            return parse_number(value, where)
    except ValueError as error:
        raise DataError(str(error)) from None
    return _checked_class(value, where)


def _checked_class(value: Any, where: str) -> str | int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: label is missing")
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: label {value!r} is a boolean; use strings or integers")
    if isinstance(value, (float, np.floating)):
        # A typed number (JSON, parquet) with a fraction is a measurement, not a class: refuse it rather
        # than make a class of every value. Whole floats are ints that a missing value turned into floats.
        if not float(value).is_integer():
            raise DataError(f"{where}: label {value!r} is not an integer or a name")
        value = int(value)
    if isinstance(value, (int, np.integer)):
        return int(value) if value >= 0 else str(int(value))  # -1 is a name like "neg", not a class id
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{where}: label is empty")
        return int(value) if _CLASS_ID.fullmatch(value) else value  # csv cells are text
    raise DataError(f"{where}: label {value!r} is of type {type(value).__name__}; use strings or integers")


def load_tables(cfg: DataConfig) -> tuple[Table, Table | None]:
    """The train table and, when the source has one, the eval table (else None: hold out)."""
    aliases = DATASET_ALIASES | CONVERTED_ALIASES
    if cfg.source in aliases:
        alias = aliases[cfg.source]()
        if cfg.task != alias.task:
            raise DataError(f"data.source={cfg.source} has {alias.task.replace('_', '-')} labels: set "
                            f"data.task={alias.task} (it is {cfg.task})")
        columns = Columns(cfg.text_column or alias.text_column, cfg.text_pair_column or alias.pair_column,
                          cfg.label_column or alias.label_column, alias.encoding, cfg.task, cfg.label_separator)
        tables = [_table_from_frame(read_file(path, columns.encoding), columns, f"{path} (data.source={cfg.source})")
                  for path in (alias.path, alias.eval_path) if path is not None]
        return tables[0], (tables[1] if len(tables) > 1 else None)
    columns = Columns(cfg.text_column or "text", cfg.text_pair_column, cfg.label_column or "label", cfg.encoding,
                      cfg.task, cfg.label_separator)
    if cfg.source is not None:
        return _load_hub(cfg, columns)
    train = _table_from_frame(read_file(cfg.train_file, columns.encoding), columns, str(cfg.train_file))
    evaluation = None
    if cfg.eval_file is not None:
        evaluation = _table_from_frame(read_file(cfg.eval_file, columns.encoding), columns, str(cfg.eval_file))
    return train, evaluation


def _load_hub(cfg: DataConfig, columns: Columns) -> tuple[Table, Table | None]:
    """A hub dataset through `datasets.load_dataset` (needs network or the local HF cache)."""
    import datasets

    def split(name: str) -> Table:
        ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=name)
        feature = ds.features.get(columns.label)
        names = getattr(feature, "names", None)
        return _table_from_frame(ds.to_pandas(), columns, f"hub dataset {cfg.source} split {name}", names)

    return split(cfg.train_split), split(cfg.eval_split) if cfg.eval_split else None
