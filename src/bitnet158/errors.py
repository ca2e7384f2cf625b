"""The exceptions bitnet158 raises on bad input; the CLI prints them as one line."""


class BitNetError(Exception):
    """Base class of every error bitnet158 raises on purpose."""


class FormatError(BitNetError):
    """A file is missing, corrupt, of an unknown kind, or holds a tensor of the wrong shape."""


class ConfigError(BitNetError):
    """A configuration value is missing, unknown or inconsistent."""


class GenerationError(BitNetError):
    """A generation request cannot be served (context overflow, bad sampling parameters)."""
