"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class DefectlabError(Exception):
    """Base class of every error defectlab raises on purpose."""


class DataError(DefectlabError):
    """Input data is missing, unreadable or inconsistent; the message names the path."""


class CheckpointError(DefectlabError):
    """A checkpoint or run directory is missing, corrupt, or from another model/version."""


class TrainingError(DefectlabError):
    """Training cannot go on (for example a NaN loss); the message says where it stopped."""


class ConfigError(DefectlabError):
    """A configuration value is unknown or has the wrong type."""


class NotFittedError(DefectlabError, RuntimeError):
    """A model was asked to predict (or export, or synthesize) before it was trained."""


class InputShapeError(ConfigError, ValueError):
    """The image size or channel count does not suit a network: a ValueError (as a model's
    own validation raises) that the command line, catching ConfigError, prints as one line."""


class OutputError(DefectlabError):
    """An output path cannot be written (a file where a folder is needed, no permission, a
    full disk, an occupied port); the message names the path and the problem."""
