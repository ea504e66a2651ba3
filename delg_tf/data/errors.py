"""Exceptions of the data room.

Every error raised for bad input data is a `DataError` (a `ValueError`), so
callers can catch one type and print its one-line message. Messages say what
was expected, what was received, and the fix, naming the file or flag.
"""


class DataError(ValueError):
    """Bad or missing input data (files, folders, CSVs, TFRecords).

    The message is a single line meant to be shown to the user as is.
    """


class ImageLoadError(DataError):
    """An image file that cannot be used (unreadable, corrupt, too small...).

    Attributes:
        path: the offending file, as given.
        reason: short machine-friendly reason, one of `REASONS`.
    """

    REASONS = (
        "missing",
        "empty",
        "unreadable",
        "not_an_image",
        "truncated",
        "too_large",
        "too_small",
        "unsupported_mode",
    )

    def __init__(self, path, reason, message):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {message}")
