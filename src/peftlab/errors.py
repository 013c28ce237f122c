"""The errors that are the user's to fix: the CLI prints them in one line instead of a traceback."""

from peftlab.checkpoints import CheckpointError
from peftlab.config import ConfigError
from peftlab.data import DataError
from peftlab.export import ExportError
from peftlab.methods import MethodError
from peftlab.models import ModelLoadError
from peftlab.pipeline import TrainingSetupError
from peftlab.runs import RunError
from peftlab.serving import ServeError
from peftlab.study import StudyError
from peftlab.train import NonFiniteLossError

USER_ERRORS = (ConfigError, DataError, MethodError, ModelLoadError, TrainingSetupError, RunError, StudyError,
               NonFiniteLossError, CheckpointError, ExportError, ServeError)
