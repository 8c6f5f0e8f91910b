"""Errors a user can cause and fix: entry points print their message as one line and exit."""


class UserError(Exception):
    """A mistake in configuration or inputs (wrong name, missing folder or checkpoint).

    The message must say what is wrong and what to do; entry points print it without a traceback.
    """
