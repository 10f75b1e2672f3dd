"""The one exception type for mistakes a user can make (bad path, wrong family, bad option)."""


class JdlmError(ValueError):
    """A user-facing error: the message names the offending value and how to fix it.

    The command line prints these without a traceback.
    """
