"""The library's own error type for problems a user can fix (bad files, missing data, wrong weights)."""


class VilError(Exception):
    """A user-facing error: the message says what was wrong, what was expected and what to do.

    The command-line tools print it as one line (no traceback) and exit with a non-zero code.
    """
