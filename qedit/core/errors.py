"""The one exception type that the CLI turns into a one-line error and exit code 2."""
from __future__ import annotations


class QeditError(ValueError):
    """Bad input or an impossible request. The message names the file, field or line and what to do."""
