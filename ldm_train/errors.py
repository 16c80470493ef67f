"""The one exception type for a user's mistake (ldm_train.config re-exports it)."""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, without a traceback."""
