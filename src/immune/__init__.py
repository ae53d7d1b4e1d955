"""IMMUNE: endpoint detection and response with an event hive."""

__version__ = "0.1.0"
