import json

import numpy as np
import pandas as pd
import pytest
from conftest import build_tokenizer, toy_rows

from peftlab.batching import LengthGroupedBatches, make_loader
from peftlab.config import DataConfig
from peftlab.data import DataError
from peftlab.splits import prepare_splits, stratified_sample
from peftlab.tokens import encode


def write_csv(path, rows, **kwargs):
    pd.DataFrame(rows).to_csv(path, index=False, **kwargs)
    return path


def splits_of(tmp_path, train_rows, eval_rows=None, **options):
    train = write_csv(tmp_path / "train.csv", train_rows)
    evaluation = write_csv(tmp_path / "eval.csv", eval_rows) if eval_rows is not None else None
    return prepare_splits(DataConfig(train_file=train, eval_file=evaluation, **options))


GOOD = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}] * 5


def test_local_files_with_string_labels(tmp_path):
    splits = splits_of(tmp_path, GOOD, GOOD[:4])
    assert splits.labels.names == ["neg", "pos"]
    assert splits.train_ids.tolist() == [1, 0] * 5 and len(splits.eval) == 4


def test_integer_labels_sort_numerically_and_csv_text_numbers_are_integers(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 11} for i in range(33)]
    splits = splits_of(tmp_path, rows, rows)
    assert splits.labels.names == [str(i) for i in range(11)]


def test_jsonl_parquet_and_text_pairs(tmp_path):
    frame = pd.DataFrame([{"premise": "a cat", "hypothesis": "an animal", "label": "entail"},
                          {"premise": "a cat", "hypothesis": "a car", "label": "contradict"}] * 3)
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "e.parquet")
    splits = prepare_splits(DataConfig(train_file=tmp_path / "t.jsonl", eval_file=tmp_path / "e.parquet",
                                       text_column="premise", text_pair_column="hypothesis"))
    assert splits.train.pairs[0] == "an animal"
    encoded = encode(splits.train, splits.train_ids, build_tokenizer(), 16, tmp_path / "cache")
    assert encoded.token_type_ids is not None and encoded.token_type_ids[0].max() == 1


def test_missing_column_lists_the_columns(tmp_path):
    with pytest.raises(DataError, match=r"train.csv: no column 'label'; the columns are: text, sentiment"):
        splits_of(tmp_path, [{"text": "a", "sentiment": "pos"}])


@pytest.mark.parametrize("text, what", [("   ", "empty"), ("", "missing")])
def test_empty_text_names_the_row(tmp_path, text, what):
    rows = GOOD[:3] + [{"text": text, "label": "pos"}]
    with pytest.raises(DataError, match=rf"train.csv: row 4, column 'text': text is {what}"):
        splits_of(tmp_path, rows)


@pytest.mark.parametrize("label, message", [(True, "label True is a boolean"), (1.5, "label 1.5 is not an integer")])
def test_bad_label_values_name_the_row(tmp_path, label, message):
    # JSONL keeps the numbers' types (in a csv, -1 and 1.5 are text: names, see test_input_safety.py)
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": label}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"row 3, column 'label': {message}"):
        prepare_splits(DataConfig(train_file=tmp_path / "train.jsonl"))


def test_label_outside_the_fixed_set(tmp_path):
    with pytest.raises(DataError, match=r"row 1: label 'pos' is not in data.labels \(known labels: neg, neutral\)"):
        splits_of(tmp_path, GOOD, labels=["neg", "neutral"])


def test_eval_label_never_seen_in_training(tmp_path):
    with pytest.raises(DataError, match=r"eval.csv: row 2: label 'meh' is never seen in training"):
        splits_of(tmp_path, GOOD, [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}])


def test_class_emptied_by_subsampling(tmp_path):
    rows = GOOD * 10 + [{"text": "rare", "label": "zzz"}]
    with pytest.raises(DataError, match=r"class\(es\) 'zzz' have no training examples after subsampling to data.n_train=10"):
        splits_of(tmp_path, rows, GOOD, n_train=10)


def test_non_utf8_bytes_name_the_line_and_the_encoding_option(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nok,pos\ncaf\u00e9,neg\nfine,pos\nbad,neg\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: line 3: byte 0xe9 is not valid utf-8; set data.encoding"):
        prepare_splits(DataConfig(train_file=path))
    splits = prepare_splits(DataConfig(train_file=path, encoding="latin-1", eval_fraction=0.5))
    assert "caf\u00e9" in splits.train.texts + splits.eval.texts


def test_duplicates_and_leaks_are_counted_not_fatal(tmp_path):
    rows = GOOD + [{"text": "good film", "label": "neg"}]
    splits = splits_of(tmp_path, rows, [{"text": "bad film", "label": "neg"}])
    assert splits.notes == {"duplicate_train_texts": 9, "conflicting_train_labels": 1, "eval_texts_also_in_train": 1}


def test_stratified_sample_keeps_shares_and_is_seeded():
    labels = np.array([0] * 700 + [1] * 200 + [2] * 100)
    chosen = stratified_sample(labels, 100, seed=3)
    assert np.bincount(labels[chosen]).tolist() == [70, 20, 10]
    assert chosen.tolist() == stratified_sample(labels, 100, seed=3).tolist()
    assert chosen.tolist() != stratified_sample(labels, 100, seed=4).tolist()


def test_held_out_split_is_disjoint_and_stratified(tmp_path):
    rows = toy_rows(200, seed=0).to_dict("records")
    splits = splits_of(tmp_path, rows, eval_fraction=0.25)
    assert len(splits.eval) == 50 and len(splits.train) == 150
    assert not set(splits.train.rows) & set(splits.eval.rows)


def test_length_grouped_batches_cover_every_row_once_and_pad_less():
    lengths = np.random.default_rng(0).integers(5, 300, size=1000)
    grouped = LengthGroupedBatches(lengths, 16, shuffle=True, group_by_length=True, seed=1)
    plain = LengthGroupedBatches(lengths, 16, shuffle=True, group_by_length=False, seed=1)

    def padding(batches):
        return sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches)

    epoch1 = list(grouped)
    assert sorted(i for b in epoch1 for i in b) == list(range(1000))
    assert padding(epoch1) < 0.2 * padding(list(plain))
    grouped.set_epoch(1)
    assert list(grouped) != epoch1  # a new order each epoch, the same for the same (seed, epoch)
    grouped.set_epoch(0)
    assert list(grouped) == epoch1


def test_tokens_are_cached_and_batches_padded_dynamically(tmp_path, monkeypatch):
    splits = splits_of(tmp_path, toy_rows(64, seed=0).to_dict("records"), GOOD)
    tokenizer = build_tokenizer()
    calls = []
    tokenize = type(tokenizer).__call__  # counted: equal arrays alone cannot tell a cache hit from a miss
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or tokenize(self, *a, **k))
    first = encode(splits.train, splits.train_ids, tokenizer, 8, tmp_path / "cache")
    cached = list((tmp_path / "cache" / "tokens").glob("*.npz"))
    assert len(cached) == 1 and first.truncated > 0 and max(first.lengths) == 8
    again = encode(splits.train, splits.train_ids, tokenizer, 8, tmp_path / "cache")
    assert all((a == b).all() for a, b in zip(first.input_ids, again.input_ids))
    assert len(calls) == 1 and again.truncated == first.truncated
    encode(splits.train, splits.train_ids, build_tokenizer(), 8, tmp_path / "cache")  # a fresh tokenizer hits too
    assert len(calls) == 1
    batch = next(iter(make_loader(first, 4, shuffle=False, group_by_length=False, seed=0, pad_id=0)))
    assert batch["input_ids"].shape[1] == max(first.lengths[:4])
    assert (batch["attention_mask"].sum(1).numpy() == first.lengths[:4]).all()


def test_a_one_megabyte_text_is_truncated_and_counted(tmp_path, make_config):
    from peftlab.tokens import prepare_data

    rows = toy_rows(40, seed=3).to_dict("records")
    rows[5]["text"] = ("good " + "w1 " * 400) * 900  # over 1 MB in one cell
    assert len(rows[5]["text"]) > 1_000_000
    train_file = write_csv(tmp_path / "long.csv", rows)
    data = prepare_data(make_config("bert", data={"train_file": str(train_file)}))
    assert data.summary()["truncated_train"] == 1
    assert data.train.lengths.max() == 32  # model.max_length of the tiny config
