"""Errors a user can cause. Every message names the node, parameter or argument and says what to do."""


class OTOError(Exception):
    """Base class of every otofx error."""


class CaptureError(OTOError):
    """The model could not be turned into a graph by any front-end."""


class InputError(OTOError):
    """The example inputs or arguments do not fit the model."""


class ShapeError(InputError):
    """An input of a size the graph was captured static for (a graph-form model from torch.export)."""


class VerificationError(OTOError):
    """A rewritten graph did not reproduce the original's outputs (a bug in otofx: please report it)."""
