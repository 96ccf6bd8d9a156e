"""Every error the device side raises for its user, under one base class. Imports nothing.

``edge/`` must not import ``tasks/`` (it ships to devices alone), so it has its own base.
"""


EXIT_USER_ERROR = 2  # what every entry point exits with after printing a user-facing error


class EdgeError(Exception):
    """A device-side problem the user can act on; the message says what to do."""


class ModelLoadError(EdgeError):
    """A model file that cannot be loaded: missing, corrupt, or of an unknown format."""


class InferenceError(EdgeError):
    """An input the model cannot run on (wrong shape or dtype)."""


class SidecarError(EdgeError):
    """A sidecar that is missing, unreadable or does not match its model file."""


class ConfigError(EdgeError):
    """A device-side setting (flag, environment variable) with a bad value; the message names it."""


class BundleRefused(EdgeError):
    """A model bundle the store will not install; ``reason`` is a short code for logs and metrics.

    Reasons: ``malformed``, ``unsigned``, ``unknown_key``, ``bad_signature``, ``tampered``, ``truncated``,
    ``unexpected_file``, ``too_large``, ``version_conflict``, ``health_check``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(EdgeError):
    """The model store cannot do what was asked (no such version, nothing to roll back to)."""


class SamplingError(EdgeError):
    """Sampling parameters or inputs that cannot be sampled (rate out of range, unsupported input shape)."""


class SampleStoreError(EdgeError):
    """A sample store that cannot be used: bad budget or folder, or a record larger than the budget allows."""


class UploadError(EdgeError):
    """An upload that was not confirmed.

    ``permanent`` is True when the receiver refused the file itself (malformed, too large): retrying the
    same bytes cannot succeed, so the uploader sets the file aside instead of blocking the queue on it.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
