"""Error types that name a user's mistake.

Everything a user can get wrong (a config field out of range, a missing data file, a corrupt checkpoint,
NaN in the data) raises a subclass of :class:`HwquantError`.  The CLI prints these as one line and exits
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HwquantError(Exception):
    """Base class of errors caused by user input."""


class ConfigError(HwquantError, ValueError):
    """A configuration field is missing, unknown or out of range."""


class DataError(HwquantError):
    """A dataset file is missing, malformed, or holds non-finite values."""


class CheckpointError(HwquantError):
    """A checkpoint file is missing, corrupt, or was written for another model."""
