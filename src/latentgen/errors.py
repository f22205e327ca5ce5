"""Domain exceptions. Every message names the problem, the offending value and the fix."""

from __future__ import annotations


class LatentgenError(Exception):
    """Base class of every error latentgen raises on purpose."""


class UnknownComponentError(LatentgenError, KeyError):
    """A component type (or kind) that no installed plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(LatentgenError):
    """Two plugins registered the same type for one kind."""


class SpecError(LatentgenError, ValueError):
    """A spec or config that does not validate, or components that do not fit together."""


class CheckpointError(LatentgenError):
    """A saved pipeline or checkpoint directory that cannot be loaded as it is."""


class DiskFullError(CheckpointError, OSError):
    """A write that ran out of disk space (ENOSPC or quota); the message says what is intact."""


class PluginLoadError(LatentgenError):
    """A plugin that failed to import or declares hooks latentgen does not know."""


class InputError(LatentgenError, ValueError):
    """User data of the wrong shape, dtype, range or format (images, codes, conditions)."""


class DataError(LatentgenError):
    """A dataset that cannot be read: empty folder, corrupt file, missing download."""


class WeightsNotFoundError(LatentgenError, FileNotFoundError):
    """Pretrained weights that are not on disk; the message says which file to put where."""
