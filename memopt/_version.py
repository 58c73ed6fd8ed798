"""memopt's version: the installed distribution's, or the source tree's when it is not installed."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["package_version"]


def package_version() -> str:
    try:
        return version("memopt")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0.1.0"
