"""The version of emitguard: the one place it is written (hatchling reads it too)."""

__version__ = "0.1.0"
