"""TSKD's version (one place: ``TSKDLib.__version__``, the ``tskd --version`` text, the model
card and the package metadata read it from here)."""

__version__ = "0.1.0"
