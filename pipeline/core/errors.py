"""Errors that end a stage with one readable line instead of a traceback."""


class PipelineError(Exception):
    """Base class: the CLI prints ``str(exc)`` and exits with code 2.

    ``transient`` says whether retrying the same step later may succeed (a server was down) or not
    (bad params, bad data); the Airflow tasks retry only transient failures.
    """

    transient = False


class ConfigError(PipelineError):
    """A params value is missing or wrong; the message names the dotted key."""


class StorageError(PipelineError):
    """Object storage is unreachable, refuses our credentials, or lacks a bucket."""

    transient = True


class ServiceError(PipelineError):
    """An embedded service could not start (busy port, missing binary, failed health check)."""


class StageFailed(PipelineError):
    """A DVC stage run by the orchestrator failed; ``transient`` comes from the stage's own error."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


class ValidationFailed(PipelineError):
    """The dataset as a whole breaks a rule; training must not start."""


class WeightsError(PipelineError):
    """Pretrained weights could not be resolved or do not fit the model."""


class CheckpointError(PipelineError):
    """A weights or checkpoint file is missing, truncated, altered or holds more than tensors; never loaded."""
