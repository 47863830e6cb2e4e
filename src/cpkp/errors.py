"""Exception types for user mistakes.

Every error a user can cause (a bad folder, a corrupt image, a wrong option) is raised as a
subclass of :class:`CpkpError` with a message that names the file or option and says what
to do. The command line turns these into one clear line and a non-zero exit code; anything
else is a bug in cpkp and keeps its traceback.
"""


class CpkpError(Exception):
    """Base class of every error cpkp raises for a user mistake."""


class ConfigError(CpkpError):
    """An option or configuration value is invalid."""


class DatasetError(CpkpError):
    """A dataset folder does not follow the layout its reader expects."""


class ImageError(CpkpError):
    """An image or mask file cannot be read or is unusable."""


class WeightsError(CpkpError):
    """Pretrained weights are missing or do not match the architecture."""


class CheckpointError(CpkpError):
    """A run folder or checkpoint cannot be loaded."""


class TrainingError(CpkpError):
    """Training cannot go on (for example a non-finite loss)."""


class ScoringError(CpkpError):
    """Scores or maps came out NaN or infinite (a damaged model or calibration)."""
