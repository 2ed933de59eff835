"""One exception family: every error a user can cause or fix is an ``Img2PromptError``.

The CLI prints the message of these (what is wrong, where, how to fix it) without a
traceback; anything else is a bug and keeps its traceback.
"""


class Img2PromptError(Exception):
    """Base class of the errors that speak to the user."""


class DataError(Img2PromptError):
    """A dataset, image or CSV file is missing or malformed."""


class ModelUnavailableError(Img2PromptError):
    """A model's code or weights are not on this machine."""


class RunError(Img2PromptError):
    """A run directory is missing, incomplete or does not match its dataset."""
