"""The exception hierarchy. Every error a user can cause is a MedVLMError with a readable message.

The CLI, the app and the API catch MedVLMError and show its message; anything else is a bug.
"""


class MedVLMError(Exception):
    """Base class for errors a user can cause and fix."""


class InputError(MedVLMError):
    """An image, a file or a request that cannot be used (not an image, truncated, too big...)."""


class ConfigError(MedVLMError):
    """A configuration value that is missing, out of range or inconsistent."""


class ModelSourceError(MedVLMError):
    """A model reference that cannot be resolved (missing folder, package, hub id offline...)."""


class CheckpointError(MedVLMError):
    """A checkpoint folder that is incomplete, corrupt or does not match its config."""
