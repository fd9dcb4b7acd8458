"""Exception types, so callers can catch exactly the failure they care about."""


class LatentDiffError(Exception):
    """Base class of every error latentdiff raises on purpose."""


class ConfigError(LatentDiffError, ValueError):
    """A configuration file or override is malformed (unknown key, wrong type, bad value)."""


class DataError(LatentDiffError, ValueError):
    """A data file is missing, truncated or corrupt."""


class ModelLoadError(LatentDiffError, ValueError):
    """A saved model folder is missing files, corrupt, or does not match its config."""


class RunDirError(LatentDiffError, RuntimeError):
    """An output folder holds another run, or a resume does not match the saved run."""


class TrainingDiverged(LatentDiffError, RuntimeError):
    """The loss became NaN or infinite."""
