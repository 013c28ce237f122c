"""`peftlab predict`: stream texts from a file or stdin through a trained classifier into JSONL."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from peftlab.data import (
    DataError,
    delimited_options,
    jsonl_records,
    reading_encoding,
    text_lines,
    text_problem,
    undecodable_error,
)
from peftlab.serving.inference import Classifier

CHUNK_ROWS = 2048  # rows read, sorted by length and predicted at a time: memory stays flat on any file size


def read_texts(source: str, text_column: str, chunk_rows: int = CHUNK_ROWS,
               encoding: str = "utf-8") -> Iterator[list[str]]:
    """Chunks of texts from csv / tsv / jsonl / parquet, or one text per line from `-` (stdin).
    A missing, empty or blank text is an error naming its row, as in training."""
    if source == "-":
        for start, chunk in _numbered(_chunks(text_lines(sys.stdin), chunk_rows)):
            yield _checked(chunk, "standard input", None, start)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".tsv", ".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl, .parquet or - for stdin)")
    reading_encoding(encoding, "encoding")  # an unknown encoding is named before anything is read
    try:
        for start, chunk in _numbered(_raw_chunks(path, suffix, text_column, chunk_rows, encoding)):
            yield _checked(chunk, str(path), text_column, start)
    except UnicodeDecodeError:
        raise undecodable_error(path, encoding, "convert it to utf-8, or pass predict_file(encoding=...)") from None


def _raw_chunks(path: Path, suffix: str, text_column: str, chunk_rows: int, encoding: str) -> Iterator[list]:
    """Chunks of the column's values as stored (None for a JSON null or an empty csv cell)."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_column not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no column {text_column!r}; the columns are: {', '.join(parquet.schema_arrow.names)}")
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=[text_column]):
            yield batch.column(0).to_pylist()
    elif suffix in (".csv", ".tsv"):
        import pandas as pd

        # Blank lines are rows too (refused as empty texts), so that output row n is input row n.
        reader = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""], skip_blank_lines=False,
                             chunksize=chunk_rows, encoding=reading_encoding(encoding), **delimited_options(suffix))
        with reader:
            for frame in reader:
                if text_column not in frame.columns:
                    raise DataError(f"{path}: no column {text_column!r}; the columns are: {', '.join(frame.columns)}")
                yield frame[text_column].tolist()
    else:
        yield from _chunks(_jsonl_texts(path, text_column, encoding), chunk_rows)


def _jsonl_texts(path: Path, column: str, encoding: str) -> Iterator:
    for number, record in jsonl_records(path, encoding):
        if not isinstance(record, dict) or column not in record:
            raise DataError(f"{path}: line {number}: no field {column!r}")
        yield record[column]


def _chunks(texts: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _numbered(chunks: Iterable[list]) -> Iterator[tuple[int, list]]:
    """Each chunk with the 1-based row number of its first row, so errors name the row in the file."""
    start = 1
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


def _checked(values: list, origin: str, column: str | None, start: int) -> list[str]:
    for offset, value in enumerate(values):
        if (what := text_problem(value)) is not None:
            where = f"line {start + offset}" if column is None else f"row {start + offset}, column {column!r}"
            raise DataError(f"{origin}: {where}: text is {what}")
    return values


def predict_file(run: Path, source: str, output: Path | None, text_column: str = "text", batch_size: int = 64,
                 chunk_rows: int = CHUNK_ROWS, show_progress: bool = True, encoding: str = "utf-8",
                 pair_column: str | None = None, raw: bool = False, abstain_below: float | None = None) -> int:
    """Write one JSON line per input row (row, and the task's answer: label, score, probabilities);
    returns the row count. A run trained on text pairs reads its second texts from `pair_column`.
    Probabilities are calibrated (the run's temperature) unless `raw`; with `abstain_below`, a row whose
    top probability is under it is marked `"abstain": true`. The output file appears only once complete
    (written aside, then renamed)."""
    from tqdm.auto import tqdm

    if abstain_below is not None and not 0 < abstain_below < 1:
        raise DataError(f"--abstain-below {abstain_below}: a probability strictly between 0 and 1")
    classifier = Classifier.from_run(run, raw=raw)
    if abstain_below is not None and classifier.task != "single_label":
        raise DataError(f"--abstain-below judges a single label's probability; this run's task is {classifier.task}")
    if pair_column is not None and source == "-":
        raise DataError("text pairs are read from a file's two columns, not from standard input")
    texts_only = read_texts(source, text_column, chunk_rows, encoding)
    seconds = read_texts(source, pair_column, chunk_rows, encoding) if pair_column else None
    # The same file read twice in step: equal chunks, row for row.
    chunks = zip(texts_only, seconds) if seconds is not None else ((texts, None) for texts in texts_only)
    partial = output.with_name(f".{output.name}.partial") if output else None
    target = open(partial, "w", encoding="utf-8") if partial else sys.stdout
    rows = 0
    try:
        with tqdm(unit="row", disable=not show_progress or output is None, dynamic_ncols=True) as bar:
            for texts, pairs in chunks:
                for row in classifier.label_rows(classifier.probabilities(texts, batch_size, pairs)):
                    if abstain_below is not None:
                        row["abstain"] = row["score"] < abstain_below
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
