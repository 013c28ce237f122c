"""Input files that are valid but unusual, and damaged caches: read right, or refused naming the row."""

import json
import os
import stat
import tracemalloc
import warnings

import pandas as pd
import pytest
from conftest import build_tokenizer, toy_rows

from peftlab.config import DataConfig
from peftlab.data import Columns, DataError, _table_from_frame, read_file
from peftlab.serving.predict import read_texts
from peftlab.splits import prepare_splits
from peftlab.tokens import encode

SEPARATORS = ["\u2028", "\u2029", "\u0085"]  # line breaks to str.splitlines(), plain characters to JSON


def labelled(n=6):
    return [{"text": f"good film {i}", "label": "pos"} if i % 2 else {"text": f"bad film {i}", "label": "neg"}
            for i in range(n)]


def write_jsonl(path, rows, ensure_ascii=False, encoding="utf-8"):
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding=encoding)
    return path


def predicted(source, column="text", **options):
    return [t for chunk in read_texts(str(source), column, **options) for t in chunk]


# --------------------------------------------------------------------------- 1. JSONL lines


def test_jsonl_texts_may_hold_unicode_line_separators(tmp_path):
    rows = labelled()
    for row, separator in zip(rows, SEPARATORS):
        row["text"] = f"one{separator}two"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    splits = prepare_splits(DataConfig(train_file=path, eval_file=path))
    assert splits.eval.texts[:3] == [f"one{s}two" for s in SEPARATORS]
    assert predicted(path)[:3] == [f"one{s}two" for s in SEPARATORS]


def test_a_bad_jsonl_line_is_named_by_its_real_number_and_crlf_is_fine(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a\xe2\x80\xa8b", "label": "pos"}\r\n{"text": \r\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: not valid JSON"):
        read_file(path, "utf-8")
    with pytest.raises(DataError, match=r"train.jsonl: line 2: not valid JSON"):
        predicted(path)


# --------------------------------------------------------------------------- 2. byte-order mark


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_a_utf8_byte_order_mark_is_dropped(tmp_path, suffix):
    frame = pd.DataFrame(labelled())
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, frame.to_dict("records"), encoding="utf-8-sig")
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert list(read_file(path, "utf-8").columns) == ["text", "label"]
    assert predicted(path) == frame["text"].tolist()


# --------------------------------------------------------------------------- 3. TSV quotes


def test_tsv_texts_may_start_with_a_quote(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"quoted start\tpos\nplain\tneg\nends "x"\tpos\n"\tneg\n', encoding="utf-8")
    expected = ['"quoted start', "plain", 'ends "x"', '"']
    assert read_file(path, "utf-8")["text"].tolist() == expected
    assert predicted(path) == expected


# --------------------------------------------------------------------------- 4. labels


def test_only_canonical_integers_are_class_ids_so_007_and_7_stay_apart(tmp_path):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(["007", "7", " 7 ", "07", "7.0", "+7"] * 2)]
    path = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    splits = prepare_splits(DataConfig(train_file=path, eval_file=path))
    assert sorted(splits.labels.names) == sorted(["007", "7", "07", "7.0", "+7"])
    names = [splits.labels.names[i] for i in splits.train_ids[:6]]
    assert names == ["007", "7", "7", "07", "7.0", "+7"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_negative_integer_labels_are_names(tmp_path, suffix):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate([-1, 0, 1] * 3)]
    path = tmp_path / f"train{suffix}"
    pd.DataFrame(rows).to_csv(path, index=False) if suffix == ".csv" else write_jsonl(path, rows)
    splits = prepare_splits(DataConfig(train_file=path, eval_file=path))
    assert sorted(splits.labels.names) == ["-1", "0", "1"]
    assert [splits.labels.names[i] for i in splits.eval_ids[:3]] == ["-1", "0", "1"]


def test_fractional_csv_labels_are_names_but_fractional_json_numbers_are_refused(tmp_path):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(["1.5", "2"] * 2)]
    path = tmp_path / "stars.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    assert sorted(prepare_splits(DataConfig(train_file=path, eval_file=path)).labels.names) == ["1.5", "2"]
    jsonl = write_jsonl(tmp_path / "scores.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError, match=r"row 2, column 'label': label 1.5 is not an integer or a name"):
        prepare_splits(DataConfig(train_file=jsonl, eval_file=jsonl))


def test_hub_class_label_minus_one_is_still_unlabelled():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, -1]})
    table = _table_from_frame(frame.iloc[:2], Columns("text", None, "label", "utf-8"), "hub", ["neg", "pos"])
    assert table.labels == ["neg", "pos"]
    with pytest.raises(DataError, match=r"hub: row 3, column 'label': label -1 is not one of the dataset's 2 classes"):
        _table_from_frame(frame, Columns("text", None, "label", "utf-8"), "hub", ["neg", "pos"])


# --------------------------------------------------------------------------- 5. memory


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_is_read_from_its_path_not_whole_into_memory(tmp_path, suffix):
    rows = [{"text": f"word{i} " * 300, "label": "pos" if i % 2 else "neg"} for i in range(500)]
    path = tmp_path / f"big{suffix}"
    pd.DataFrame(rows).to_csv(path, index=False) if suffix == ".csv" else write_jsonl(path, rows)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        frame = read_file(path, "utf-8")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(frame) == 500
    # The texts themselves take about `size`; a copy of the whole file as bytes, text or lines would add more.
    assert peak < 2.0 * size, f"reading a {size:,}-byte file peaked at {peak:,} bytes"


def test_an_undecodable_byte_far_into_the_file_names_its_line(tmp_path):
    path = tmp_path / "late.jsonl"
    lines = [json.dumps({"text": f"t{i}", "label": "pos"}).encode() for i in range(5000)]
    lines[4321] = '{"text": "caf\u00e9", "label": "neg"}'.encode("latin-1")
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    with pytest.raises(DataError, match=r"late.jsonl: line 4322: byte 0xe9 is not valid utf-8; set data.encoding"):
        read_file(path, "utf-8")
    with pytest.raises(DataError, match=r"late.jsonl: line 4322: byte 0xe9 is not valid utf-8"):
        predicted(path)


# --------------------------------------------------------------------------- 6. predict refuses missing texts


@pytest.mark.parametrize("suffix, body, row, what", [
    (".jsonl", '{"text": "fine"}\n{"text": null}\n', 2, "missing"),
    (".jsonl", '{"text": "fine"}\n\n{"text": "   "}\n', 2, "empty"),
    (".jsonl", '{"text": "fine"}\n{"text": 5}\n', 2, "not text"),
    (".csv", "text\nfine\n\"\"\nmore\n", 2, "missing"),
    (".csv", "text\nfine\nmore\n\" \"\n", 3, "empty"),
    (".csv", "text\nfine\n\nmore\n", 2, "missing"),  # a blank line is a row: output row n stays input row n
    (".tsv", "text\nfine\n \n", 2, "empty"),
])
def test_predict_refuses_a_missing_or_blank_text_naming_the_row(tmp_path, suffix, body, row, what):
    path = tmp_path / f"in{suffix}"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=rf"in{suffix}: row {row}, column 'text': text is {what}"):
        predicted(path)


def test_predict_names_the_row_in_the_whole_file_not_in_its_chunk(tmp_path):
    path = tmp_path / "in.parquet"
    pd.DataFrame({"text": ["a", "b", "c", "d", None]}).to_parquet(path)
    with pytest.raises(DataError, match=r"in.parquet: row 5, column 'text': text is missing"):
        predicted(path, chunk_rows=2)


def test_predict_refuses_a_blank_line_on_stdin(monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("good\n\nbad\n"))
    with pytest.raises(DataError, match=r"standard input: line 2: text is empty"):
        predicted("-")


# --------------------------------------------------------------------------- 7. token cache


def cache_setup(tmp_path):
    rows = toy_rows(24, seed=0)
    path = tmp_path / "train.csv"
    rows.to_csv(path, index=False)
    splits = prepare_splits(DataConfig(train_file=path, eval_file=path))
    return splits, build_tokenizer()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_token_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    splits, tokenizer = cache_setup(tmp_path)
    first = encode(splits.train, splits.train_ids, tokenizer, 16, tmp_path / "cache")
    [cached] = (tmp_path / "cache" / "tokens").glob("*.npz")
    data = cached.read_bytes()
    cached.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    with pytest.warns(UserWarning, match=r"token cache .* is damaged"):
        again = encode(splits.train, splits.train_ids, tokenizer, 16, tmp_path / "cache")
    assert [a.tolist() for a in again.input_ids] == [a.tolist() for a in first.input_ids]
    assert cached.read_bytes() == data  # rebuilt in place
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode(splits.train, splits.train_ids, tokenizer, 16, tmp_path / "cache")


def test_the_token_cache_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    splits, tokenizer = cache_setup(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        return real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    encode(splits.train, splits.train_ids, tokenizer, 16, tmp_path / "cache")
    assert events == ["fsync-file", "rename", "fsync-dir"]
