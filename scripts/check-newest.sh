#!/usr/bin/env bash
# Runs the fast tests against the newest releases of transformers, peft, accelerate and datasets,
# past the upper bounds in pyproject.toml (which hold the releases the suite has passed with).
# Usage: bash scripts/check-newest.sh [--torch-newest] [VENV_DIR]
#   VENV_DIR        scratch venv, emptied and rebuilt on each run (default /tmp/peftlab-newest)
#   --torch-newest  the newest torch from $TORCH_INDEX_URL (default PyTorch's CPU index) instead
#                   of the local torch==2.13.0; refused before any download when pip's pick would
#                   not come from that index (out of reach: on this project's machines it is), so
#                   that no CUDA build of several GB comes in its place.
# Exit status: pytest's (`-m "not slow" -x -q`, from the repo root). No GPU needed; the network
# reached is the package registries only. Nothing in .venv or pyproject.toml is changed.
# Green: raise the bounds in pyproject.toml to the releases printed here.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_newest=false
case "${1:-}" in
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    --torch-newest) torch_newest=true; shift ;;
    -*) echo "unknown option $1 (usage: bash scripts/check-newest.sh [--torch-newest] [VENV_DIR])" >&2; exit 2 ;;
esac
venv="${1:-/tmp/peftlab-newest}"
# `venv --clear` empties the folder: only ever one that is a venv already, or empty, or absent.
if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
    echo "$venv exists and is not a venv; name another folder" >&2; exit 2
fi
python3 -m venv --clear "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip "$@"; }
pip install -q --upgrade pip

# torch first, as in setup.sh: torch==2.13.0 is a local CPU build; a bare `torch` requirement,
# from us or from transformers/peft/accelerate, would pull gigabytes of CUDA packages.
if $torch_newest; then
    index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    # Resolve without downloading, and go on only if pip's pick comes from that index. --isolated
    # leaves out the user's and the environment's pip settings (here: local wheels and indexes).
    pick=$(pip --isolated install -q --dry-run --ignore-installed --report - --index-url "$index" torch 2>/dev/null |
        "$py" -c '
import json, sys, urllib.parse
index = urllib.parse.urlparse(sys.argv[1]).netloc
report = sys.stdin.read()  # empty when pip found no torch there (an index out of reach)
for item in json.loads(report)["install"] if report else []:
    if item["metadata"]["name"] == "torch":
        url = item["download_info"]["url"]
        print(item["metadata"]["version"] if urllib.parse.urlparse(url).netloc == index else "none: " + url)
' "$index") || pick=""
    case "$pick" in
        ""|none*) echo "no torch from $index (pip's pick: ${pick:-none}); not installing another build" >&2; exit 2 ;;
        *) pip --isolated install -q --index-url "$index" "torch==$pick" ;;
    esac
else
    pip install -q torch==2.13.0
fi

# The newest of the bounded libraries, named explicitly: pip only has to keep the torch above.
pip install -q --upgrade transformers peft accelerate datasets
# Then every other requirement of peftlab[dev], read from pyproject.toml, under constraints that
# hold torch and the four at what was just installed (no dependency may move them back).
constraints="$venv/newest-constraints.txt"
"$py" -c "import tomllib" 2>/dev/null || pip install -q tomli
"$py" - pyproject.toml "$venv/rest-requirements.txt" "$constraints" <<'EOF'
import importlib.metadata as md
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
held = ["torch", "transformers", "peft", "accelerate", "datasets"]
extras = project["optional-dependencies"]
requirements, todo, seen = list(project["dependencies"]), ["dev"], set()
while todo:  # dev names peftlab[offline,...]: follow the self-references
    extra = todo.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for requirement in extras[extra]:
        own = re.fullmatch(r"peftlab\[([^\]]+)\]", requirement.replace(" ", ""))
        if own:
            todo += own.group(1).split(",")
        else:
            requirements.append(requirement)
name = lambda r: re.match(r"[A-Za-z0-9._-]+", r).group(0).lower().replace("_", "-")
with open(sys.argv[2], "w") as out:
    out.writelines(r + "\n" for r in requirements if name(r) not in held)
with open(sys.argv[3], "w") as out:
    out.writelines(f"{p}=={md.version(p)}\n" for p in held)
EOF
pip install -q -r "$venv/rest-requirements.txt" -c "$constraints"
# peftlab itself last and alone: `pip install -e .[dev]` would enforce the upper bounds and refuse
# the newest releases (installed before the rest, pip would also call its requirements missing).
pip install -q --no-deps -e .
# peftlab's own upper bounds show up here once a newer release is out: expected, not fatal.
pip check || echo "(pip check: conflicts above; peftlab's own upper bounds are expected among them)"

echo "== installed in $venv (newest on the package index in brackets)"
for p in torch transformers peft accelerate datasets tokenizers huggingface-hub safetensors; do
    newest=$(pip index versions "$p" 2>/dev/null | sed -n '1s/.*(\(.*\))/\1/p') || newest="?"
    echo "$p $("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p") [${newest:-?}]"
done

echo "== fast tests"
exec "$py" -m pytest -m "not slow" -x -q
