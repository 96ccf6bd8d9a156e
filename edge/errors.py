"""Every error the device side raises for its user, under one base class. Imports nothing.

``edge/`` must not import ``tasks/`` (it ships to devices alone), so it has its own base.
"""


class EdgeError(Exception):
    """A device-side problem the user can act on; the message says what to do."""


class ModelLoadError(EdgeError):
    """A model file that cannot be loaded: missing, corrupt, or of an unknown format."""


class InferenceError(EdgeError):
    """An input the model cannot run on (wrong shape or dtype)."""


class SidecarError(EdgeError):
    """A sidecar that is missing, unreadable or does not match its model file."""
