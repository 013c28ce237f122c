"""`peftlab predict`: stream texts from a file or stdin through a trained classifier into JSONL."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from peftlab.data import DataError
from peftlab.inference import Classifier

CHUNK_ROWS = 2048  # rows read, sorted by length and predicted at a time: memory stays flat on any file size


def read_texts(source: str, text_column: str, chunk_rows: int = CHUNK_ROWS,
               encoding: str = "utf-8") -> Iterator[list[str]]:
    """Chunks of texts from csv / tsv / jsonl / parquet, or one text per line from `-` (stdin)."""
    if source == "-":
        yield from _chunks((line.rstrip("\n") for line in sys.stdin), chunk_rows)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_column not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no column {text_column!r}; the columns are: {', '.join(parquet.schema_arrow.names)}")
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=[text_column]):
            yield _checked(batch.column(0).to_pylist(), path, text_column)
    elif suffix in (".csv", ".tsv"):
        import pandas as pd

        reader = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=object, keep_default_na=False,
                             chunksize=chunk_rows, encoding=encoding)
        for frame in reader:
            if text_column not in frame.columns:
                raise DataError(f"{path}: no column {text_column!r}; the columns are: {', '.join(frame.columns)}")
            yield _checked(frame[text_column].tolist(), path, text_column)
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding=encoding) as handle:
            yield from _chunks(_jsonl_texts(handle, path, text_column), chunk_rows)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl, .parquet or - for stdin)")


def _jsonl_texts(handle, path: Path, column: str) -> Iterator[str]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or column not in record:
            raise DataError(f"{path}: line {number}: no field {column!r}")
        yield str(record[column])


def _chunks(texts, size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _checked(values: list, path: Path, column: str) -> list[str]:
    for offset, value in enumerate(values):
        if value is None:
            raise DataError(f"{path}: column {column!r} has an empty value (row {offset + 1} of its chunk)")
    return [str(v) for v in values]


def predict_file(run: Path, source: str, output: Path | None, text_column: str = "text", batch_size: int = 64,
                 chunk_rows: int = CHUNK_ROWS, show_progress: bool = True) -> int:
    """Write one JSON line per input row (row, label, score, probabilities); returns the row count.
    The output file appears only once complete (written aside, then renamed)."""
    from tqdm.auto import tqdm

    classifier = Classifier.from_run(run)
    chunks = read_texts(source, text_column, chunk_rows)
    partial = output.with_name(f".{output.name}.partial") if output else None
    target = open(partial, "w", encoding="utf-8") if partial else sys.stdout
    rows = 0
    try:
        with tqdm(unit="row", disable=not show_progress or output is None, dynamic_ncols=True) as bar:
            for texts in chunks:
                for row in classifier.label_rows(classifier.probabilities(texts, batch_size)):
                    target.write(json.dumps({"row": rows, **row}) + "\n")
                    rows += 1
                bar.update(len(texts))
    except BaseException:
        if partial:
            target.close()
            partial.unlink(missing_ok=True)
        raise
    if partial:
        target.close()
        partial.replace(output)
    return rows
