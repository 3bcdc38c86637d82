"""Exceptions with messages that name the problem and the fix (all ValueErrors, so the tools print
them as one `error:` line)."""


class ConfigError(ValueError):
    """A config file, key or value is wrong."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class NonFiniteError(FloatingPointError, ValueError):
    """A network produced NaN or Inf values (its weights, or an overflowing dtype); the message names
    the network and its file."""
