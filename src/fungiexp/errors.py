"""Exceptions that fungiexp raises for bad configs and bad data."""

from __future__ import annotations


class FungiexpError(Exception):
    """Base class of the errors fungiexp raises on purpose."""


class ConfigError(FungiexpError, ValueError):
    """An invalid config value, carrying the dotted key it came from.

    Args:
        key: Dotted config key, for example ``fine_tune.trainable_from``.
        message: What is wrong with the value and how to fix it.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(FungiexpError):
    """Images or archives that cannot be used as they are."""


class SourceNotFoundError(DataError, FileNotFoundError):
    """A configured archive or folder that does not exist."""
