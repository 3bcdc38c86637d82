"""Exceptions with messages that name the problem and the fix."""


class ConfigError(ValueError):
    """A config file, key or value is wrong."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""
