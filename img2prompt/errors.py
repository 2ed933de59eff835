"""One exception family: every error a user can cause or fix is an ``Img2PromptError``.

The CLI prints the message of these (what is wrong, where, how to fix it) without a
traceback; anything else is a bug and keeps its traceback. Messages quote file names and
ids from untrusted data, so ``printable`` escapes what could drive a terminal.
"""

import re
import sys

# C0/C1 control characters (escape sequences start with ESC) and Unicode direction overrides
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNPRINTABLE_OR_NEWLINE = re.compile(f"{_UNPRINTABLE.pattern[:-1]}\n\t]")


def printable(text, keep_newlines=True) -> str:
    """``text`` with control characters written as ``\\xNN`` (``\\u202e``) escapes, so that
    printing it cannot move the cursor, recolour the terminal or reverse the text.
    Newlines and tabs stay unless ``keep_newlines`` is false (for a quoted name or id)."""
    pattern = _UNPRINTABLE if keep_newlines else _UNPRINTABLE_OR_NEWLINE
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                       else f"\\u{ord(m.group()):04x}", str(text))


def shown(name) -> str:
    """A file name or id from the data, quoted for a message."""
    return f"'{printable(name, keep_newlines=False)}'"


class Img2PromptError(Exception):
    """Base class of the errors that speak to the user."""


class DataError(Img2PromptError):
    """A dataset, image or CSV file is missing or malformed."""


class ModelUnavailableError(Img2PromptError):
    """A model's code or weights are not on this machine."""


class RunError(Img2PromptError):
    """A run directory is missing, incomplete or does not match its dataset."""


class TrainingDiverged(RunError):
    """A training's losses became infinite or NaN: its learning rate is too high for it."""


_noticed = set()


def notice(message):
    """Tell the user something worth knowing that stops nothing (once per process), on
    stderr: the command line and notebooks show it, results on stdout stay clean."""
    if message not in _noticed:
        _noticed.add(message)
        print(f"notice: {printable(message)}", file=sys.stderr, flush=True)


class StorageError(Img2PromptError):
    """A file could not be written (a full disk, a folder without permission) or read back."""
