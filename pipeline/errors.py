"""Errors that end a stage with one readable line instead of a traceback."""


class PipelineError(Exception):
    """Base class: the CLI prints ``str(exc)`` and exits with code 2."""


class ConfigError(PipelineError):
    """A params value is missing or wrong; the message names the dotted key."""


class StorageError(PipelineError):
    """Object storage is unreachable, refuses our credentials, or lacks a bucket."""


class ServiceError(PipelineError):
    """An embedded service could not start (busy port, missing binary, failed health check)."""


class ValidationFailed(PipelineError):
    """The dataset as a whole breaks a rule; training must not start."""


class WeightsError(PipelineError):
    """Pretrained weights could not be resolved or do not fit the model."""
