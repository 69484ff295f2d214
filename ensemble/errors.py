"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in input, configuration or environment that the user can fix."""
