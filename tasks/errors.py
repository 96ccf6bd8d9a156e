"""Every error the pipeline raises for its user, under one base class. Imports nothing.

Entry points (the ``edgeloop`` command, the stage CLIs) catch :class:`EdgeloopError` and
:class:`edge.errors.EdgeError` and print the message without a traceback; anything else is a bug and
keeps its traceback.
"""


class EdgeloopError(Exception):
    """A problem the user can act on; the message says what is wrong and what to do."""


class ConfigError(EdgeloopError, ValueError):
    """A parameter file or inventory that cannot be used; the message names each bad key."""


class DataError(EdgeloopError, ValueError):
    """A dataset that cannot be trained on; the message says what is wrong and how to fix it."""


class ModelZooError(EdgeloopError, ValueError):
    """A model that cannot be built, loaded or adapted; the message says what to do instead."""


class StageError(EdgeloopError):
    """A stage that cannot finish (missing input of an earlier stage, a refused step, ...)."""


class QualityFloorError(StageError):
    """The float32 baseline did not beat chance by the required margin: the model did not learn."""


class GateFailure(StageError):
    """No variant passed every quality gate; nothing is registered."""


class PromotionRefused(StageError):
    """A promotion attempted without an approving decision."""


class ServiceUnavailable(StageError):
    """A server (MLflow, a registry, a device) did not answer. Transient: flows retry it."""


class PackagingError(StageError):
    """An image that cannot be built, fails an image gate, or cannot be pushed; nothing is shipped."""
