"""Errors that are the user's to fix (bad file, bad option, bad config).

The CLI prints these as one clear line without a traceback; library users can catch them like any
ValueError. Messages should name the file/line/key at fault and say how to fix it.
"""


class UserError(ValueError):
    """A problem with the user's input, reported without a traceback by the CLI."""
