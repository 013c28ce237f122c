"""docs/config.md is generated from the config classes' docstrings (scripts/config_docs.py): it must be
up to date, and every key must have a description to generate."""

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    # scripts/ is not a package: load the script by its path.
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


config_docs = _generator()


def test_config_reference_is_up_to_date():
    written = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert written == config_docs.render(), "docs/config.md is out of date: run python scripts/config_docs.py"


def test_every_key_and_section_is_described():
    undescribed = [f"{section.key}.{name} ({cls.__name__})"
                   for section in config_docs.sections() for cls in section.classes
                   for name, field in cls.model_fields.items() if not (field.description or "").strip()]
    assert not undescribed, f"add a docstring below each of these fields: {', '.join(undescribed)}"
    no_paragraph = [cls.__name__ for section in config_docs.sections() for cls in section.classes
                    if not (cls.__dict__.get("__doc__") or "").strip()]
    assert not no_paragraph, f"add a class docstring (the section's paragraph) to: {', '.join(no_paragraph)}"


def test_every_run_config_section_is_documented():
    from peftlab.config import RunConfig

    documented = {section.key for section in config_docs.sections()}
    assert set(RunConfig.model_fields) <= documented


def test_no_speed_figures_in_the_reference():
    # Measured figures live in bench/RESULTS.md only; the reference links there.
    figures = re.findall(r"\d+(?:\.\d+)?\s*(?:s\b|×|x faster|samples/s)", config_docs.render())
    assert not figures, f"measured figures belong in bench/RESULTS.md, not docs/config.md: {figures}"


def test_check_mode_names_the_command(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# stale\n", encoding="utf-8")
    monkeypatch.setattr(config_docs, "DOC", stale)
    assert config_docs.main(["--check"]) == 1
    assert "run python scripts/config_docs.py" in capsys.readouterr().err
    assert config_docs.main([]) == 0 and config_docs.main(["--check"]) == 0
