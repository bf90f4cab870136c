"""qedit's version string, as the installed package metadata gives it."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def qedit_version() -> str:
    try:
        return version("qedit")
    except PackageNotFoundError:
        return "0+unknown"
