"""IMMUNE: endpoint detection and response with an event hive."""

__version__ = "0.1.0"

from immune.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
