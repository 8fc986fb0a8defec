"""The exceptions mmorepa's library raises for bad input.

Each is a ``ValueError``. The library never prints or exits; the tools in ``tools/`` catch
:class:`MMOrepaError` and print its message as one line with exit status 1.
"""


class MMOrepaError(ValueError):
    """Base of mmorepa's errors: a bad value, path, config or checkpoint, named in the message."""


class CheckpointError(MMOrepaError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


class ConfigError(MMOrepaError):
    """A config or model description that cannot be built, converted or deployed."""
