"""Errors the engine raises. Each message says what is wrong and how to fix it."""
from __future__ import annotations


class GraftError(Exception):
    """Base of every error the engine raises on purpose (bad input, missing weights...)."""


class DataError(GraftError):
    """The dataset folder cannot be used as it is (layout, classes, no images)."""


class ImageError(GraftError):
    """One image cannot be used (unreadable, truncated, too large). Training skips it and reports it."""


class UnknownBackbone(GraftError):
    """The backbone name is not in the registry."""


class WeightsUnavailable(GraftError):
    """Pretrained weights were asked for but are not on this machine and cannot be downloaded."""


class WeightsImportError(GraftError):
    """A weights file given to `graft weights import` is not the expected file."""


class CheckpointError(GraftError):
    """A checkpoint or model file is missing, corrupt or belongs to another run."""


class SpecError(GraftError):
    """The run's parameters do not fit the chosen backbone or data."""


class RunStopped(GraftError):
    """The run was stopped through `Callbacks.should_stop` (cancelled). Not an error for the user."""
