"""Long texts (data.long_texts): windows, their combination per text, and runs that read past max_length."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
from conftest import FILLER, NEGATIVE, POSITIVE, build_tokenizer
from test_serve import Server, status_and_json
from test_train import LEARNABLE

from peftlab.batching import LengthGroupedBatches
from peftlab.config_loading import validate_config
from peftlab.errors import ConfigError
from peftlab.evaluation import Predictions, long_text_scores
from peftlab.runs import load_run
from peftlab.serving.adapters import ServedModel
from peftlab.serving.inference import Classifier
from peftlab.training.run import train
from peftlab.windows import Windowing, combine, window_texts


def test_chunks_cover_every_token_in_overlapping_windows():
    tokenizer = build_tokenizer()
    words = [FILLER[i % len(FILLER)] for i in range(31)]
    windowed = window_texts(tokenizer, [" ".join(words), "good w1"], None,
                            Windowing("chunks", max_length=12, stride=3), with_types=False)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    content = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    rows = [ids for ids, d in zip(windowed.input_ids, windowed.documents) if d == 0]
    assert all(r[0] == cls and r[-1] == sep and len(r) <= 12 for r in windowed.input_ids)
    inner = [r[1:-1] for r in rows]
    assert [x for x in inner[0]] == content[:10] and inner[-1] == content[-len(inner[-1]):]
    for before, after in zip(inner, inner[1:]):
        assert before[-3:] == after[:3]  # `stride` tokens shared with the window before
    assert len(inner) == 4 and windowed.documents.tolist() == [0, 0, 0, 0, 1]
    assert windowed.text_tokens.tolist() == [31, 2] and windowed.truncated == 1


def test_head_tail_keeps_the_first_and_last_tokens_and_truncate_counts_whole_lengths():
    tokenizer = build_tokenizer()
    text = " ".join(FILLER[:30])
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    kept = window_texts(tokenizer, [text], None, Windowing("head_tail", max_length=12, head_tokens=4), False)
    assert kept.input_ids[0][1:-1] == content[:4] + content[-6:] and kept.documents is None
    cut = window_texts(tokenizer, [text, "w1 w2"], None, Windowing("truncate", max_length=12), False)
    assert cut.input_ids[0][1:-1] == content[:10] and cut.text_tokens.tolist() == [30, 2] and cut.truncated == 1


def test_window_logits_combine_per_text():
    logits = np.array([[1.0, 0.0], [3.0, -2.0], [0.5, 0.5]], dtype=np.float32)
    documents = np.array([0, 0, 1])
    assert combine(logits, documents, "mean").tolist() == [[2.0, -1.0], [0.5, 0.5]]
    assert combine(logits, documents, "max").tolist() == [[3.0, 0.0], [0.5, 0.5]]
    expected = np.log(np.exp(logits[:2]).sum(axis=0))
    assert combine(logits, documents, "logsumexp")[0] == pytest.approx(expected, rel=1e-6)


def test_long_text_figures_count_only_the_texts_one_window_cannot_hold():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    predictions = Predictions(logits, np.array([0, 1, 1, 1]), np.zeros(4))
    scores = long_text_scores("single_label", predictions, np.array([False, False, True, True]), ["a", "b"])
    assert scores["long_texts"] == 2 and scores["accuracy_long"] == 0.0 and scores["f1_macro_long"] == 0.0
    assert long_text_scores("single_label", predictions, np.array([True, False, False, False]), ["a", "b"]) == {}
    assert long_text_scores("single_label", predictions, None, ["a", "b"]) == {}
    # Multi-label keeps the thresholds chosen over every text: at 0.9 nothing is predicted, F1 is 0.
    multi = Predictions(logits * 2 - 2, np.array([[1, 0], [0, 1], [1, 0], [1, 0]]), np.zeros(4))
    long = np.array([True, True, True, True])
    assert long_text_scores("multi_label", multi, long, ["a", "b"], chosen=[0.5, 0.5])["f1_micro_long"] == 1.0
    assert long_text_scores("multi_label", multi, long, ["a", "b"], chosen=[0.9, 0.9])["f1_micro_long"] == 0.0


def test_at_most_max_chunks_per_doc_windows_of_a_text_each_epoch():
    documents = np.repeat(np.arange(5), [1, 6, 2, 9, 3])
    batches = LengthGroupedBatches(np.full(len(documents), 10), 4, shuffle=True, group_by_length=True, seed=3,
                                   documents=documents, max_per_document=2)
    epochs = []
    for epoch in range(2):
        batches.set_epoch(epoch)
        rows = [i for batch in batches for i in batch]
        assert len(rows) == len(set(rows)) == 1 + 2 + 2 + 2 + 2 and len(batches) == 3
        assert np.bincount(documents[rows]).tolist() == [1, 2, 2, 2, 2]
        epochs.append(sorted(rows))
    assert epochs[0] != epochs[1]  # drawn afresh each epoch


def test_bad_long_text_settings_fail_in_one_line():
    base = {"data": {"source": "tweets", "long_texts": "chunks"}, "model": {"max_length": 64}}
    with pytest.raises(ConfigError, match="data.stride=64 must be smaller than model.max_length=64"):
        validate_config({**base, "data": {**base["data"], "stride": 64}})
    with pytest.raises(ConfigError, match="data.head_tokens=70 leaves no tail"):
        validate_config({**base, "data": {"source": "tweets", "long_texts": "head_tail", "head_tokens": 70}})
    with pytest.raises(ConfigError, match="text pairs"):
        validate_config({**base, "data": {**base["data"], "text_pair_column": "other"}})
    resolved = validate_config(base).data
    assert resolved.stride == 16 and resolved.chunk_pooling == "mean"


def late_word_rows(n: int, seed: int) -> pd.DataFrame:
    """Thirty filler words, the sentiment word among the last eight: past a 16-token window's reach."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(30)]
        label = rng.choice(["positive", "negative"])
        words.insert(rng.randint(23, 30), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture
def late_word_files(tmp_path):
    files = {}
    for name, frame in (("train", late_word_rows(240, 1)), ("eval", late_word_rows(80, 2))):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        files[f"{name}_file"] = str(tmp_path / f"{name}.csv")
    return files


def test_chunks_and_head_tail_read_what_truncation_cuts_off(make_config, late_word_files, tmp_path, capsys):
    from peftlab.serving.predict import predict_file

    kind, lr = LEARNABLE["full"]
    accuracy = {}
    for mode in ("truncate", "head_tail", "chunks"):
        config = make_config("bert", method=kind, model={"max_length": 16},
                             data={**late_word_files, "long_texts": mode},
                             train={"epochs": 6, "lr": lr, "warmup_ratio": 0.1}, output={"name": mode})
        run = load_run(train(config))
        accuracy[mode] = run.summary["best"]["accuracy"]
        data = run.summary["data"]
        assert data["n_eval"] == 80 and data["train_text_tokens"]["share_longer"] == 1.0
        if mode == "chunks":
            assert data["eval_windows"] == 3 * 80 and run.summary["best"]["confusion_matrix"] is not None
            out = tmp_path / "predictions.jsonl"
            assert predict_file(run.path, late_word_files["eval_file"], out, show_progress=False) == 80
            predicted = [json.loads(line)["label"] for line in out.read_text().splitlines()]
            truth = pd.read_csv(late_word_files["eval_file"])["label"].tolist()
            final = np.mean([p == t for p, t in zip(predicted, truth)])
            assert final == pytest.approx(run.summary["final"]["accuracy"], abs=1.5 / 80)
        # Every eval text is longer than the window: the long-text figures are the figures.
        assert run.summary["best"]["long_texts"] == 80
        assert run.summary["best"]["accuracy_long"] == run.summary["best"]["accuracy"]
        if mode != "truncate":  # served as evaluated: head and tail, or every window combined
            texts = pd.read_csv(late_word_files["eval_file"])["text"].tolist()[:4]
            expected = Classifier.from_run(run.path, device="cpu").probabilities(texts)
            with Server(ServedModel.from_model(run.path, device="cpu")) as server:
                status, answers = status_and_json(server.url, "/predict", {"inputs": texts})
            assert status == 200
            for answer, row in zip(answers, expected):
                assert {a["label"]: a["score"] for a in answer} == pytest.approx(dict(zip(run.labels, row)), abs=1e-5)
    assert accuracy["truncate"] <= 0.7 and accuracy["head_tail"] >= 0.9 and accuracy["chunks"] >= 0.9, accuracy
    assert "hint: 100% of the training texts are longer than max_length=16" in capsys.readouterr().out


def test_chunks_need_a_classifier_that_reads_the_first_token(make_config, make_study, tmp_path):
    import transformers as tf

    from peftlab.studies.running import run_study
    from peftlab.studies.study import load_study
    from peftlab.windows import check_classifier

    small = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    mean = tmp_path / "modernbert-mean"
    tf.ModernBertConfig(**small, classifier_pooling="mean").save_pretrained(mean)
    with pytest.raises(ConfigError, match=r"chunks needs a classifier that reads the first token; .* pools mean"):
        train(make_config("bert", model={"name": str(mean)}, data={"long_texts": "chunks"}))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # stopped before any work
    spec = make_study(grid={"model.name": [str(mean)], "data.long_texts": ["truncate", "chunks"]})
    study = load_study(spec)
    with pytest.raises(ConfigError, match="pools mean"):
        run_study(study, progress=False)
    assert not study.directory.exists()  # not even the truncated run started
    check_classifier("chunks", "cls", tf.ModernBertConfig(**small, classifier_pooling="cls"))
    check_classifier("truncate", "mean", tf.ModernBertConfig(**small, classifier_pooling="mean"))
    for family in ("bert", "roberta", "deberta-v2", "distilbert"):
        check_classifier("chunks", family, tf.AutoConfig.for_model(family))
    with pytest.raises(ConfigError, match=r"a family peftlab does not know \(gpt2\)"):
        check_classifier("chunks", "gpt2", tf.GPT2Config(n_layer=1))
