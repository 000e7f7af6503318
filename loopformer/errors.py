"""User-facing errors: each carries one line that names the field and the fix.

The CLI catches `LoopformerError`, prints `error: <message>` and exits with status 2, so a user
never sees a stack trace from deep inside JAX for a mistake they made.
"""


class LoopformerError(Exception):
    """Base class for errors caused by user input (configs, files, flags)."""


class ConfigError(LoopformerError):
    """A config key, value, type or shape is invalid."""


class DataError(LoopformerError):
    """A data source or task setting is invalid."""


class CheckpointError(LoopformerError):
    """A checkpoint is missing, corrupt, or belongs to a different model."""


class PlanError(LoopformerError):
    """A loop count, gate or circuit name given to run a model does not fit it."""


class AnalysisError(LoopformerError):
    """A flag of an analysis command does not fit the run (no such run, unknown split, impossible request)."""


class DecodingError(PlanError):
    """Cached decoding cannot run this model or plan exactly (recomputing the whole prefix can)."""


class OutputError(LoopformerError):
    """Standard output could not be written (a full disk behind `> file`, /dev/full): not the run's files."""
