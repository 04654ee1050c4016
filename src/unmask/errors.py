"""The one exception type for problems a user can fix (bad input, bad files, bad flags)."""


class UnmaskError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
