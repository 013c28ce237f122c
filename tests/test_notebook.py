"""examples/quickstart.ipynb runs from top to bottom (on the tiny model), so that it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_study

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def outputs_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        data = output.get("data", {})
        parts += [data.get("text/plain", ""), data.get("text/html", "")]
    return "\n".join(parts)


def test_the_quickstart_notebook_runs_on_the_tiny_model(make_config, tiny_models, toy_files, tmp_path):
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    config = make_config("bert", method={"kind": "full"}, train={"epochs": 6, "lr": 2e-3, "warmup_ratio": 0.1})
    study = write_study(tiny_models, toy_files, tmp_path, variants={"r2": {"method.r": 2}, "r4": {"method.r": 4}})
    parameters.source = "\n".join([
        f"config = {config.model_dump(mode='json')!r}",
        f"run_changes = {{'output': {{'dir': {str(tmp_path / 'runs')!r}, 'name': 'notebook'}}}}",
        f"study_spec = {str(study)!r}",
        "study_changes = {'seeds': 2, 'train': {'epochs': 1}}",
        "texts = ['w1 good w2', 'w3 bad w4 w5', 'w6 great']",
    ])
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # a cell that raises fails the test (CellExecutionError)

    code = [c for c in notebook.cells if c.cell_type == "code"]
    by_source = {c.source.splitlines()[0]: outputs_of(c) for c in code}
    assert "Run(" in by_source["import peftlab"] and "f1_macro" in by_source["import peftlab"]
    printed = by_source["classifier = peftlab.load(run.path)"].splitlines()
    assert [line.split()[0] for line in printed if line.strip()] == ["pos", "neg", "pos"]
    assert "image/png" in str(code[3].outputs)  # the loss curve
    assert "f1_macro_std" in by_source["result = peftlab.study(study_spec, **study_changes)"]
    shown = by_source["result.report()"]
    assert "Study: toy-study" in shown and "report.html" in shown  # displayed inline, and its path returned
    assert (tmp_path / "runs" / "toy-study" / "report" / "report.html").is_file()
