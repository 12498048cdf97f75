"""One exception family for everything TSKD reports to a user.

Every error raised on bad input is a :class:`TSKDError`; its message names the offending file (or
setting) and says how to fix it, so the CLI and the Slicer module can show it as it is, in one line.
"""

from __future__ import annotations

from pathlib import Path


class TSKDError(Exception):
    """Base class of every error TSKD raises on purpose.

    Parameters
    ----------
    message:
        What is wrong, in one sentence.
    path:
        The file or folder concerned, if any; it is prepended to the message.
    fix:
        How the user can fix it; appended to the message.
    """

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.path = str(path) if path is not None else None
        self.fix = fix
        text = message
        if self.path:
            text = f"{self.path}: {text}"
        if fix:
            text = f"{text} Fix: {fix}"
        super().__init__(text)


class InputError(TSKDError):
    """An input file is missing, unreadable, or holds data TSKD cannot use (4D, RGB, NaN, empty)."""


class GeometryError(InputError):
    """An image and its labels do not share physical space (no overlap, or unusable geometry)."""


class LabelError(InputError):
    """Labels are unusable: values missing from the class map, no labelled slice, bad class map."""


class CheckpointError(TSKDError):
    """A foundation-model checkpoint is missing, corrupt, or does not match the chosen model type."""


class ModelPackageError(TSKDError):
    """A model package directory is missing files, corrupt, or of an unknown format version."""


class ConfigError(TSKDError):
    """A configuration value is invalid."""


class RunExistsError(TSKDError):
    """An output would overwrite a finished run or a user file and ``--overwrite`` was not given."""


class CorruptFileError(InputError):
    """An input file is damaged: truncated, or its compressed data fails its checksum (gzip CRC)."""


class DicomSeriesError(InputError):
    """A DICOM folder does not hold one complete, regular series (missing or duplicated slices,
    several series, mixed orientation or size, varying slice spacing)."""


class WriteError(TSKDError):
    """An output could not be written (no space left, permission denied, read-only file system);
    the previous file, if any, is left unchanged."""


class RunLockedError(TSKDError):
    """Another TSKD process is working in the same run directory."""


class TSKDWarning(UserWarning):
    """Something TSKD could read but the user should know (for example a message of ITK's readers,
    which would otherwise only reach the C++ standard error)."""
