"""`peftlab.load`: a finished run as a classifier to predict with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftlab.serving.inference import Classifier


def load(run: str | Path, device: str | None = None, raw: bool = False) -> "Classifier":
    """The classifier of a finished run directory: `.predict(texts)` -> Predictions, `.predict_proba(texts)`
    -> probabilities. Probabilities are calibrated with the run's temperature unless `raw`."""
    from peftlab.serving.inference import Classifier

    return Classifier.from_run(Path(run), device=device, raw=raw)
