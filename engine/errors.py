"""Errors a user can cause. The CLI prints ``error: <message>`` for these and exits with status 2."""


class LipforcingError(Exception):
    """Base class for user-caused errors (bad input, missing weights, wrong configuration)."""


class MediaError(LipforcingError):
    """A video or audio input cannot be read, or an output cannot be written."""


class NoFaceError(LipforcingError):
    """No usable face was found where one is required."""


class WeightsError(LipforcingError):
    """A weights file is missing, unreadable, unsafe or does not match the model."""


class ConfigError(LipforcingError):
    """An option or configuration value is invalid."""
