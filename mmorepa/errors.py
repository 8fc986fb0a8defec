"""The exceptions mmorepa's library raises for bad input.

Each is a ``ValueError``. The library never prints or exits; the tools in ``tools/`` run through
:func:`mmorepa.cli.run_tool`, which prints the message of a :class:`MMOrepaError` as one line and
exits with status 1.
"""


class MMOrepaError(ValueError):
    """Base of mmorepa's errors: a bad value, path, config or checkpoint, named in the message."""


class CheckpointError(MMOrepaError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


class ConfigError(MMOrepaError):
    """A config or model description that cannot be built, converted or deployed."""


class PathError(MMOrepaError):
    """A file or folder that cannot be read or written: missing, of the wrong kind, not
    writable, a name too long, or an input that would be overwritten."""


class ArgumentError(MMOrepaError):
    """An argument value outside what a function takes: an input shape, a calibration method,
    a penalty weight."""
