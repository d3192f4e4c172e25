"""Errors that the CLI and the HTTP layer turn into one clear line for the user."""


class Mp2aError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class DataError(Mp2aError):
    """Bad or missing input data (dataset folder, domain, image)."""


class ModelError(Mp2aError):
    """A model reference that cannot be resolved or loaded."""


class ArtifactError(Mp2aError):
    """A missing, incomplete or damaged model artifact."""


class ExportError(Mp2aError):
    """An export that cannot run here or does not meet its parity threshold."""
