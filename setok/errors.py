"""User-facing errors. The CLI prints their message as one line and exits with code 2.

`InputError` (a bad frame, text or argument: the caller's mistake this call) and `BundleError`
(a bad deployment: the bundle on disk is missing files, tampered with or malformed) are separate
classes; catch `SetokError` for both. Bugs are not SetokErrors: they keep their traceback.
"""


class SetokError(Exception):
    """A user mistake: the message says what was received, what was expected, what to do."""

    exit_code = 2


class InputError(SetokError):
    """A bad image, text, folder or argument."""


class CheckpointError(SetokError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class MissingDependency(SetokError):
    """An optional dependency (tensorrt, triton, ...) is needed but not installed."""


class BundleError(SetokError):
    """A bundle that is missing files, tampered with, or of an unknown schema."""
