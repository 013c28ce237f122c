"""The Python API (`import peftlab`): train, study, report and load, with the objects they return.
The command line is a thin layer over these same calls (cli.py)."""

from peftlab.api.loading import load
from peftlab.api.running import Run, train
from peftlab.api.studying import StudyResult, report, study

__all__ = ["Run", "StudyResult", "load", "report", "study", "train"]
