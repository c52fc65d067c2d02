"""Errors a user can cause: bad media, no face, missing weights, bad configuration.

    from lipforcing.engine.errors import LipforcingError, MediaError
    try:
        ...
    except LipforcingError as err:       # the CLI prints "error: <message>" and exits 2
        print(f"error: {err}")

Every message names the offending input and, where there is one, the fix. Programming errors
(wrong tensor shapes passed between engine modules, bugs) are not `LipforcingError`s and keep their
tracebacks.
"""

from __future__ import annotations


class LipforcingError(Exception):
    """Base class of errors caused by the user's inputs or setup (not by a bug)."""


class MediaError(LipforcingError):
    """A video or audio file cannot be read or written (missing, corrupt, no stream, bad codec)."""


class NoFaceError(LipforcingError):
    """No usable face was found where one is required (e.g. in the whole clip)."""


class WeightsError(LipforcingError):
    """Model weights are missing, unreadable, unsafe to load or do not match the model."""


class ConfigError(LipforcingError):
    """An option or a combination of options is invalid."""


class EngineBusy(ConfigError):
    """Every session slot of an engine is taken (a server answers ``busy``)."""
