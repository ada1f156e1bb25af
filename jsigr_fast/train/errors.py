"""The errors the training layer reports to a user (the CLI prints their message, no traceback).

Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["TrainError", "ConfigError", "CheckpointError", "DataError", "NonFiniteError"]


class TrainError(Exception):
    """Base class: a problem with the user's configuration, files or run, with a message that says
    what is wrong and, where there is one, what to do about it."""

    exit_code = 2


class ConfigError(TrainError, ValueError):
    """An unknown or badly typed config key, an impossible combination, a missing teacher."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be read, is not ours, or does not match the run."""


class DataError(TrainError):
    """A dataset that cannot be found or read."""


class NonFiniteError(TrainError):
    """The loss or the gradients stayed non-finite for too many steps in a row."""

    exit_code = 3
