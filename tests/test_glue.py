"""The GLUE presets (studies/glue-*.yaml), published reference figures in a study, and the report's table
of them. The presets load and expand without the Hub: loading a study never touches data."""

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_study

from peftlab.errors import StudyError
from peftlab.studies.report import reference_table, write_report
from peftlab.studies.results import Configuration, ResultSet, RunResult
from peftlab.studies.running import run_study
from peftlab.studies.study import STUDY_FILE, load_study

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"roberta": ROOT / "studies" / "glue-roberta-lora.yaml",
           "distilbert": ROOT / "studies" / "glue-distilbert-lora.yaml"}

# task -> (text column, pair column, data.task, eval split, best metric, labels in GLUE's order)
GLUE = {
    "cola": ("sentence", None, "single_label", "validation", "mcc", ["unacceptable", "acceptable"]),
    "sst2": ("sentence", None, "single_label", "validation", "accuracy", ["negative", "positive"]),
    "mrpc": ("sentence1", "sentence2", "single_label", "validation", "f1", ["not_equivalent", "equivalent"]),
    "qqp": ("question1", "question2", "single_label", "validation", "f1", ["not_duplicate", "duplicate"]),
    "stsb": ("sentence1", "sentence2", "regression", "validation", "pearson", None),
    "mnli-m": ("premise", "hypothesis", "single_label", "validation_matched", "accuracy",
               ["entailment", "neutral", "contradiction"]),
    "mnli-mm": ("premise", "hypothesis", "single_label", "validation_mismatched", "accuracy",
                ["entailment", "neutral", "contradiction"]),
    "qnli": ("question", "sentence", "single_label", "validation", "accuracy", ["entailment", "not_entailment"]),
    "rte": ("sentence1", "sentence2", "single_label", "validation", "accuracy", ["entailment", "not_entailment"]),
}
# The metric of each task's column in the LoRA paper's Table 2 (MRPC and QQP: accuracy; MNLI: one figure)
TABLE_METRIC = {"mnli-m": "accuracy", "sst2": "accuracy", "mrpc": "accuracy", "cola": "mcc", "qnli": "accuracy",
                "qqp": "accuracy", "rte": "accuracy", "stsb": "pearson"}


@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to read data (the Hub above all) fails the test."""
    import datasets

    import peftlab.data

    def refuse(*args, **kwargs):
        raise AssertionError("loading a study read data")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(peftlab.data, "load_tables", refuse)


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_glue_preset_expands_every_task_with_its_own_columns_split_and_metric(model, no_data):
    study = load_study(PRESETS[model])
    assert [c.label for c in study.cells] == [f"{task}, {method}" for task in study.spec.variant_groups()[0]
                                              for method in ("full", "lora")]
    assert set(study.spec.variant_groups()[0]) == set(GLUE) and len(study.runs) == 18 * 3
    targets = {"roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"]}[model]
    baselines = study.baselines()
    for cell in study.cells:
        task, method = cell.variants
        text, pair, kind, split, best, labels = GLUE[task]
        config = cell.config
        assert config.model.name == {"roberta": "roberta-base", "distilbert": "distilbert-base-uncased"}[model]
        assert (config.data.source, config.data.hub_config) == ("glue", task.split("-")[0]), cell.label
        assert (config.data.text_column, config.data.text_pair_column) == (text, pair), cell.label
        assert (config.data.task, config.data.eval_split, config.train.best_metric) == (kind, split, best), cell.label
        assert config.data.labels == labels and config.data.train_split == "train"
        assert config.method.kind == method
        if method == "lora":
            assert (config.method.r, config.method.targets, config.train.lr) == (8, targets, 5e-4)
        else:
            assert config.train.lr == {"roberta": 2e-5, "distilbert": 5e-5}[model]
        assert baselines[cell.label] == f"{task}, full"  # each task's LoRA against its own full fine-tuning
    assert study.spec.metric == "accuracy" and study.spec.select == "best"


def test_roberta_reference_figures_are_the_lora_papers_and_average_as_it_prints(no_data):
    references = load_study(PRESETS["roberta"]).references()
    assert len(references) == 18  # every cell has its published figure
    for method, published_average in (("full", 86.4), ("lora", 87.2)):
        figures = [100 * references[f"{task}, {method}"][metric]["value"] for task, metric in TABLE_METRIC.items()]
        assert len(figures) == 8
        assert abs(statistics.mean(figures) - published_average) <= 0.05 + 1e-9, (method, statistics.mean(figures))
    assert references["mnli-mm, lora"] == references["mnli-m, lora"]  # one MNLI figure, beside both cells
    assert references["rte, lora"]["accuracy"]["value"] == pytest.approx(0.866)
    assert "MNLI" in references["rte, lora"]["accuracy"]["source"]  # started from an MNLI checkpoint: said
    assert {s["source"] for r in references.values() for s in r.values()} >= {
        "Hu et al. 2021 (LoRA), Table 2, RoB-base (FT): taken from Liu et al. 2019 (RoBERTa); GLUE dev"}


def test_distilbert_reference_figures_are_sanh_et_al_for_full_fine_tuning_only(no_data):
    references = load_study(PRESETS["distilbert"]).references()
    published = {task: 100 * figures[TABLE_METRIC.get(task, "accuracy")]["value"]
                 for label, figures in references.items() for task in [label.split(", ")[0]]}
    assert all(label.endswith(", full") for label in references)
    assert published == pytest.approx({"cola": 51.3, "sst2": 91.3, "qnli": 89.2, "rte": 59.9, "mnli-m": 82.2,
                                       "mnli-mm": 82.2})
    assert all("Sanh et al. 2019" in f["source"] for figures in references.values() for f in figures.values())


def test_the_offline_twin_runs_the_same_machinery_on_packaged_data(no_data):
    study = load_study(ROOT / "studies" / "offline" / "glue-shapes.yaml")
    assert all(c.config.model.name == "minilm" and c.config.data.source == "tweets" for c in study.cells)
    assert {c.config.train.best_metric for c in study.cells} == {"f1_macro", "mcc"}
    assert study.baselines()["tweets-small, lora"] == "tweets-small, full"
    assert study.references()["tweets, lora"]["f1_macro"]["value"] == 0.735


# --------------------------------------------------------------------------- the format


def test_variant_groups_cross_and_later_groups_override(make_study):
    study = load_study(make_study(
        variants=[{"small": {"data.n_train": 100, "train.lr": 1e-3}, "large": {"data.n_train": 200}},
                  {"full": {"method.kind": "full", "train.lr": 5e-5}, "lora": {"method.kind": "lora"}}],
        grid={"train.epochs": [1, 2]}))
    assert [c.label for c in study.cells][:3] == ["large, full, epochs=1", "large, full, epochs=2",
                                                  "large, lora, epochs=1"]  # (write_study sorts the names)
    assert len(study.cells) == 8
    configs = {c.label: c.config for c in study.cells}
    assert configs["small, full, epochs=1"].train.lr == 5e-5  # the method group overrides the task's rate
    assert configs["small, lora, epochs=2"].train.lr == 1e-3 and configs["large, lora, epochs=2"].data.n_train == 200
    with pytest.raises(StudyError, match="variant name.*full.*more than one group"):
        load_study(make_study(variants=[{"full": {}}, {"full": {"method.kind": "full"}}]))


def test_a_baseline_matching_several_cells_gives_each_the_nearest(make_study):
    path = make_study(variants=[{"a": {"data.n_train": 100}, "b": {"data.n_train": 200}},
                                {"full": {"method.kind": "full"}, "lora": {"method.kind": "lora"}}],
                      baseline="full")
    assert load_study(path).baselines() == {"a, full": "a, full", "a, lora": "a, full",
                                            "b, full": "b, full", "b, lora": "b, full"}
    assert load_study(path, ["baseline=a, full"]).baselines()["b, lora"] == "a, full"  # one cell: as before
    by_keys = make_study(name="by-keys", variants={"x": {"data.n_train": 100}, "y": {"data.n_train": 200}},
                         grid={"method.kind": ["full", "lora"]}, baseline={"method.kind": "full"})
    assert load_study(by_keys).baselines()["y, lora"] == "y, full"
    # Two baseline cells as near as each other to a third: refused, not guessed.
    tied = make_study(name="tied", variants={"a": {"train.epochs": 1}, "b": {"train.epochs": 1, "data.n_train": 99},
                                             "c": {"train.epochs": 2}}, baseline={"train.epochs": 1})
    with pytest.raises(StudyError, match="cell 'c' is as close to 'a' as to 'b'; name one cell"):
        load_study(tied)


def test_reference_figures_are_checked_against_the_cells(make_study):
    good = {"source": "Someone 2020, Table 1", "figures": {"lora": {"accuracy": 91.5}}}
    study = load_study(make_study(grid={"method.kind": ["full", "lora"]}, reference=[good]))
    assert study.references() == {"lora": {"accuracy": {"value": 0.915, "source": "Someone 2020, Table 1",
                                                        "statistic": "median"}}}
    for bad, message in (
            ({"figures": {"dora": {"accuracy": 91.5}}}, "'dora': no cell or variant has that name"),
            ({"figures": {"lora": {"pearson": 91.5}}}, "pearson is not a metric of cell 'lora'"),
            ({"figures": {"lora": {"accuracy": 191.5}}}, "191.5 is out of range for a figure in points"),
            ({"percent": False, "figures": {"lora": {"accuracy": 91.5}}}, "on the metric's own scale"),
            ({"figures": {"lora": {"acc": 91.5}}}, "figures.lora.acc")):
        with pytest.raises(StudyError, match=message):
            load_study(make_study(grid={"method.kind": ["full", "lora"]},
                                  reference=[{"source": "Someone 2020", **bad}]))
    with pytest.raises(StudyError, match="already has a published accuracy"):
        load_study(make_study(grid={"method.kind": ["full", "lora"]}, reference=[good, good]))


# --------------------------------------------------------------------------- the report


def _run(seed: int, best_metric: str, **metrics: float) -> RunResult:
    return RunResult(Path(f"run-{seed}"), {"train.seed": seed, "train.best_metric": best_metric},
                     {"best": metrics}, [])


def test_reference_table_sets_mean_median_and_the_published_figure_side_by_side():
    cola = Configuration("cola, lora", [_run(seed, "mcc", mcc=mcc, accuracy=0.8)
                                        for seed, mcc in ((42, 0.60), (43, 0.64), (44, 0.65))])
    stsb = Configuration("stsb, lora", [_run(s, "pearson", pearson=p, spearman=p - 0.01, mse=0.4)
                                        for s, p in ((42, 0.90), (43, 0.91))])
    mrpc = Configuration("mrpc, lora", [_run(42, "f1", f1=0.9, accuracy=0.875)])
    source = "Hu et al. 2021, Table 2"
    results = ResultSet("glue", [cola, stsb, mrpc], metric="accuracy", references={
        "cola, lora": {"mcc": {"value": 0.634, "source": source, "statistic": "median"}},
        "stsb, lora": {"pearson": {"value": 0.915, "source": source + " (from MNLI)", "statistic": "median"}},
        "mrpc, lora": {"accuracy": {"value": 0.897, "source": source, "statistic": "median"}}})
    table = reference_table(results)
    rows = {(row[0], row[1]): row[2:] for row in table.rows}
    assert rows[("cola, lora", "Matthews correlation")] == ["3", "63.0 ± 2.6", "64.0", "63.4 [1]", "+0.6"]
    assert ("cola, lora", "accuracy") not in rows  # neither the task's metric, its companion nor published
    assert rows[("stsb, lora", "Pearson r")] == ["2", "90.5 ± 0.7", "90.5", "91.5 [2]", "-1.0"]
    assert rows[("stsb, lora", "Spearman ρ")][3:] == ["—", ""]  # reported beside Pearson, nothing published
    assert [key[1] for key in rows if key[0] == "mrpc, lora"] == ["F1", "accuracy"]
    assert rows[("mrpc, lora", "accuracy")] == ["1", "87.5", "87.5", "89.7 [1]", "-2.2"]
    assert "[1] Hu et al. 2021, Table 2 [2] Hu et al. 2021, Table 2 (from MNLI)" in table.note
    assert reference_table(ResultSet("none", [cola])) is None


def test_a_study_with_reference_figures_and_mixed_tasks_writes_them_into_its_report(tiny_models, toy_files,
                                                                                     tmp_path):
    """Two tasks (a classification and a regression, which has no accuracy) x full / LoRA, one seed."""
    train, evaluation = (pd.read_csv(f) for f in toy_files)
    for frame, name in ((train, "score-train.csv"), (evaluation, "score-eval.csv")):
        frame.assign(label=(frame.label == "pos").astype(float) * 4 + 0.5).to_csv(tmp_path / name, index=False)
    path = write_study(
        tiny_models, toy_files, tmp_path, "glue-toy", train={"epochs": 1}, seeds=1, baseline="full",
        variants=[{"toy": {"train.best_metric": "f1", "data.n_train": 64},
                   "score": {"data.task": "regression", "data.train_file": str(tmp_path / "score-train.csv"),
                             "data.eval_file": str(tmp_path / "score-eval.csv"), "train.best_metric": "pearson",
                             "data.n_train": 64}},
                  {"full": {"method.kind": "full", "train.lr": 1e-3}, "lora": {"method.kind": "lora"}}],
        metric="accuracy",
        reference=[{"source": "Toy et al. 2024, Table 9", "figures": {"toy, lora": {"accuracy": 75.0},
                                                                     "score": {"pearson": 50.0}}}])
    study = load_study(path)
    assert run_study(study, progress=False) == {}
    record = json.loads((study.directory / STUDY_FILE).read_text())
    assert {c["label"]: c["baseline"] for c in record["cells"]}["score, lora"] == "score, full"
    markdown = (write_report([study.directory]) / "report.md").read_text()

    assert "### Against published figures" in markdown and "[1] Toy et al. 2024, Table 9" in markdown
    lines = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
             for line in markdown.split("### Against published figures")[1].split("###")[0].splitlines()
             if line.startswith("| ")}
    toy = json.loads((study.directory / "toy_lora-seed42" / "summary.json").read_text())["best"]
    assert f"| {100 * toy['accuracy']:.1f} | 75.0 [1] | {100 * (toy['accuracy'] - 0.75):+.1f} |" in \
        lines[("toy, lora", "accuracy")]
    assert ("toy, lora", "F1") in lines and ("toy, full", "F1") in lines
    assert "50.0 [1]" in lines[("score, full", "Pearson r")] and "50.0 [1]" in lines[("score, lora", "Pearson r")]
    assert ("score, lora", "Spearman ρ") in lines
    # The regression has no accuracy: shown as such, not a crash; each task compared with its own full run.
    assert "### Against each configuration's baseline" in markdown
    quality = markdown.split("### Quality")[1].split("###")[0]
    assert any(line.startswith("| score, lora | 1 | — |") for line in quality.splitlines())
    assert "| score, lora | score, full | — |" in markdown and "| toy, lora | toy, full | 1 |" in markdown
