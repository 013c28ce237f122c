"""Every error of peftlab's that is the user's to fix. A leaf: it imports nothing of the package,
so any module may raise these without reaching into another layer. The CLI prints a `PeftlabError`
in one line instead of a traceback."""


class PeftlabError(Exception):
    """Base of the errors below."""


class ConfigError(PeftlabError, ValueError):
    """A configuration problem; the message lists every bad key at once."""


class DataError(PeftlabError, ValueError):
    """Bad input data; the message names the file, row and column at fault."""


class MethodError(PeftlabError, ValueError):
    """A method setting that does not fit the model (unknown target module, ...)."""


class ModelLoadError(PeftlabError, OSError):
    """A model that cannot be loaded (missing, not safetensors, not a classifier)."""


class TrainingSetupError(PeftlabError, ValueError):
    """A training or speed setting this machine or model cannot honour (e.g. fp16 without a GPU)."""


class RunError(PeftlabError, RuntimeError):
    """A run directory that is missing, unfinished or in the way."""


class CheckpointError(PeftlabError, RuntimeError):
    """A checkpoint that cannot be written, read or resumed from."""


class NonFiniteLossError(PeftlabError, RuntimeError):
    """The loss became NaN or infinite; training stopped before the optimizer step."""


class StudyError(PeftlabError, ValueError):
    """A study file that cannot be expanded, or a finished run that disagrees with it."""


class ExportError(PeftlabError, RuntimeError):
    """An export that could not be made or did not reproduce the run's predictions."""


class ServeError(PeftlabError, ValueError):
    """A model or adapter that cannot be served as asked; the message names it."""


USER_ERRORS = (PeftlabError,)
