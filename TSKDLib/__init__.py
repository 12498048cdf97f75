"""TSKDLib: task-specific knowledge distillation for medical image segmentation.

Backend of the TSKD 3D Slicer extension (it never imports qt, ctk or slicer). Method: Liang et
al., "Task-specific knowledge distillation from the vision foundation model for enhanced medical
image segmentation", arXiv 2503.06976.
"""

from TSKDLib.version import __version__  # noqa: F401

from TSKDLib.errors import (CheckpointError, ConfigError, GeometryError, InputError, LabelError,  # noqa: F401
                     ModelPackageError, RunExistsError, TSKDError, CorruptFileError, DicomSeriesError,
                     WriteError, RunLockedError, TSKDWarning)


def __getattr__(name):
    """Lazy access to the main API (``TSKDLib.train``, ``TSKDLib.segment``) without importing
    PyTorch at ``import TSKDLib``."""
    if name in ("train", "segment"):
        from TSKDLib.pipeline import run as pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'TSKDLib' has no attribute {name!r}")
