"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Something the user can fix: a bad path, size, option or file."""


class CheckpointError(UserError):
    """A checkpoint is missing, malformed, in a refused format, or does not fit the model."""


class ConfigError(UserError):
    """A configuration value is unknown, unsupported or inconsistent."""
