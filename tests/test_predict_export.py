"""Using a finished run: predict (streaming, any input format) and export (merged, ONNX)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from peftlab.cli import main
from peftlab.metrics import classification_metrics
from peftlab.runs import load_run
from peftlab.serving.export import ExportError, export_run
from peftlab.serving.inference import Classifier
from peftlab.serving.predict import predict_file
from peftlab.training.run import train


@pytest.fixture(scope="module")
def lora_run(tiny_models, toy_files, tmp_path_factory):
    from peftlab.config_loading import validate_config

    root = tmp_path_factory.mktemp("run")
    config = validate_config({
        "model": {"name": str(tiny_models["bert"]), "max_length": 32},
        "data": {"train_file": str(toy_files[0]), "eval_file": str(toy_files[1])},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"},
        "train": {"epochs": 3, "lr": 1e-2},
        "output": {"dir": str(root), "name": "lora", "progress": False, "cache_dir": str(root / "cache")},
    })
    return train(config)


def eval_texts(toy_files) -> list[str]:
    return pd.read_csv(toy_files[1])["text"].tolist()


def test_predictions_reproduce_the_runs_evaluation(lora_run, toy_files):
    classifier = Classifier.from_run(lora_run)
    probabilities = classifier.probabilities(eval_texts(toy_files), batch_size=7)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    labels = np.array([classifier.labels.index(x) for x in pd.read_csv(toy_files[1])["label"]])
    metrics = classification_metrics(labels, probabilities.argmax(axis=1), classifier.labels)
    best = load_run(lora_run).summary["best"]
    assert metrics["confusion_matrix"] == best["confusion_matrix"] and metrics["accuracy"] == best["accuracy"]


def test_predict_reads_every_format_and_stdin_with_the_same_answers(lora_run, toy_files, tmp_path):
    frame = pd.read_csv(toy_files[1])
    frame.to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "in.parquet")
    outputs = {}
    for name, source in [("csv", str(toy_files[1])), ("jsonl", str(tmp_path / "in.jsonl")),
                         ("parquet", str(tmp_path / "in.parquet"))]:
        out = tmp_path / f"{name}.jsonl"
        assert main(["predict", str(lora_run), "--input", source, "--output", str(out)]) == 0
        outputs[name] = out.read_text()
    stdin = subprocess.run([sys.executable, "-m", "peftlab", "predict", str(lora_run), "--input", "-"],
                           input="\n".join(frame["text"]) + "\n", capture_output=True, text=True, timeout=120)
    assert stdin.returncode == 0, stdin.stderr
    outputs["stdin"] = stdin.stdout
    assert len(set(outputs.values())) == 1
    rows = [json.loads(line) for line in outputs["csv"].splitlines()]
    assert [r["row"] for r in rows] == list(range(len(frame)))
    assert set(rows[0]) == {"row", "label", "score", "probabilities"} and set(rows[0]["probabilities"]) == {"neg", "pos"}
    assert all(r["score"] == max(r["probabilities"].values()) for r in rows)


def test_predict_streams_in_chunks_with_identical_results(lora_run, toy_files, tmp_path):
    predict_file(lora_run, str(toy_files[1]), tmp_path / "big.jsonl", chunk_rows=10_000, show_progress=False)
    predict_file(lora_run, str(toy_files[1]), tmp_path / "small.jsonl", chunk_rows=7, show_progress=False)
    big, small = ([json.loads(x) for x in (tmp_path / n).read_text().splitlines()] for n in ("big.jsonl", "small.jsonl"))
    assert [r["label"] for r in big] == [r["label"] for r in small]
    assert np.allclose([r["score"] for r in big], [r["score"] for r in small], atol=1e-5)


def test_predict_names_a_missing_column_and_leaves_no_partial_output(lora_run, toy_files, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(lora_run), "--input", str(toy_files[1]), "--text-column", "review",
                 "--output", str(out)]) == 2
    assert "no column 'review'; the columns are: text, label" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_merged_export_loads_without_peft_and_predicts_the_same(lora_run, toy_files, tmp_path):
    out = export_run(lora_run, tmp_path / "merged")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not any(name.startswith("adapter") for name in files) and not any(n.endswith(".bin") for n in files)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "| accuracy |" in card
    texts = eval_texts(toy_files)[:20]
    expected = Classifier.from_run(lora_run).probabilities(texts)
    script = (
        "import sys, json, torch\n"
        "sys.modules['peft'] = None  # the merged model must not need peft\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"batch = tok({texts!r}, padding=True, truncation=True, max_length=32, return_tensors='pt')\n"
        "with torch.inference_mode():\n"
        "    print(json.dumps(torch.softmax(model(**batch).logits, -1).tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.allclose(json.loads(done.stdout), expected, atol=1e-5)


def test_onnx_export_is_checked_with_onnxruntime(lora_run, toy_files, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    assert main(["export", str(lora_run), "--merged", str(tmp_path / "out"), "--onnx"]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    classifier = Classifier.from_run(lora_run)
    texts = eval_texts(toy_files)
    batch = classifier.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    logits = session.run(["logits"], feeds)[0]
    assert (logits.argmax(-1) == classifier.probabilities(texts).argmax(-1)).all()


def test_merge_refuses_non_finite_adapter_weights(lora_run, tmp_path, monkeypatch):
    import peftlab.methods as methods

    real = methods.load_run_model

    def poisoned(run):
        model = real(run)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
        return model

    monkeypatch.setattr(methods, "load_run_model", poisoned)
    with pytest.raises(ExportError, match="cannot merge the adapter"):
        export_run(lora_run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
