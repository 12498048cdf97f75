"""Intensity normalisation presets and aspect-preserving resizing to the model input size.

Both are recorded in the model card, so that segmenting a new scan applies exactly what
training applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

import numpy as np

from TSKDLib.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where SliceResizer needs it: Normalization stays torch-free
    import torch

# CT window presets (width, level) in HU; standard radiology display windows.
CT_WINDOWS = {
    "ct-abdomen": (400.0, 40.0),
    "ct-liver": (150.0, 30.0),
    "ct-lung": (1500.0, -600.0),
    "ct-bone": (1800.0, 400.0),
    "ct-brain": (80.0, 40.0),
    "ct-mediastinum": (350.0, 50.0),
}


@dataclass
class Normalization:
    """Intensity normalisation to ``[0, 1]``.

    ``kind = "window"``: CT window/level in HU, ``x -> clip((x - (level - width/2)) / width, 0, 1)``.
    ``kind = "percentile"``: clip to the ``low``/``high`` percentiles of the *whole volume*
    (MR, ultrasound, endoscopy), then scale to ``[0, 1]``. Per-volume rather than per-slice, so
    slices of one scan keep their relative brightness.
    """

    kind: str = "window"
    width: float = 400.0
    level: float = 40.0
    low: float = 0.5
    high: float = 99.5

    @classmethod
    def preset(cls, name: str) -> "Normalization":
        """``ct`` / ``ct-abdomen`` / ``ct-lung`` / ... (windows), ``mr``, ``us``, ``percentile``."""
        name = name.lower()
        if name == "ct":
            name = "ct-abdomen"
        if name in CT_WINDOWS:
            w, l = CT_WINDOWS[name]
            return cls("window", width=w, level=l)
        if name in {"mr", "mri", "us", "ultrasound", "percentile", "endoscopy", "xray", "other"}:
            return cls("percentile")
        raise ConfigError(f"unknown normalisation preset {name!r}; choose one of "
                          f"{sorted(CT_WINDOWS) + ['ct', 'mr', 'us', 'percentile']}.")

    @classmethod
    def for_modality(cls, modality: str | None, array: np.ndarray | None = None) -> "Normalization":
        """Pick a preset from a DICOM modality, else from the intensities (CT has air near -1000 HU)."""
        if modality:
            m = modality.upper()
            if m == "CT":
                return cls.preset("ct")
            return cls.preset("percentile")
        if array is not None and float(np.min(array)) <= -500.0:
            return cls.preset("ct")
        return cls.preset("percentile")

    def fit(self, volume: np.ndarray) -> "FittedNormalization":
        """Compute the intensity range for one volume; returns the applicable mapping."""
        if self.kind == "window":
            lo, hi = self.level - self.width / 2.0, self.level + self.width / 2.0
        elif self.kind == "percentile":
            lo, hi = (float(v) for v in np.percentile(volume, [self.low, self.high]))
            if hi <= lo:
                lo, hi = float(volume.min()), float(volume.max())
        else:
            raise ConfigError(f"unknown normalisation kind {self.kind!r}.")
        if hi <= lo:
            hi = lo + 1.0
        return FittedNormalization(lo, hi)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FittedNormalization:
    """Linear map ``[lo, hi] -> [0, 1]`` with clipping (intensities in the image's units)."""

    lo: float
    hi: float

    def __call__(self, array: np.ndarray) -> np.ndarray:
        out = (np.asarray(array, dtype=np.float32) - np.float32(self.lo)) / np.float32(self.hi - self.lo)
        return np.clip(out, 0.0, 1.0, out=out)


@dataclass(frozen=True)
class SliceResizer:
    """Aspect-preserving resize of a 2D slice to ``size x size`` with zero padding, and its inverse.

    The slice (``H x W`` pixels of physical spacing ``spacing = (row_mm, col_mm)``) is scaled so
    that its longer *physical* side fills ``size`` pixels, then padded symmetrically with zeros.
    ``to_model`` and ``from_model`` are exact inverses for label maps whenever the scale is >= 1
    (upsampling, or native size); when downsampling, thin structures can be lost by the model
    resolution itself.

    Attributes
    ----------
    in_shape: (H, W) of the native slice.
    size: model input size S.
    new_shape: (h, w) after scaling, before padding.
    pad: (top, left) padding in model pixels.
    """

    in_shape: tuple[int, int]
    size: int
    new_shape: tuple[int, int]
    pad: tuple[int, int]

    @classmethod
    def create(cls, in_shape: tuple[int, int], size: int,
               spacing: tuple[float, float] = (1.0, 1.0)) -> "SliceResizer":
        h, w = int(in_shape[0]), int(in_shape[1])
        ph, pw = h * float(spacing[0]), w * float(spacing[1])
        scale = size / max(ph, pw)
        nh = min(size, max(1, int(round(ph * scale))))
        nw = min(size, max(1, int(round(pw * scale))))
        return cls((h, w), int(size), (nh, nw), ((size - nh) // 2, (size - nw) // 2))

    # -- forward ------------------------------------------------------------------------------
    def to_model(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resize ``(..., H, W)`` to ``(..., S, S)``. ``mode``: "bilinear" (images, antialiased
        when shrinking) or "nearest" (labels, integer dtype kept)."""
        import torch.nn.functional as F

        lead = x.shape[:-2]
        y = x.reshape(-1, 1, *x.shape[-2:])
        if mode == "nearest":
            y = F.interpolate(y.float(), size=self.new_shape, mode="nearest-exact").to(x.dtype)
        else:
            shrink = self.new_shape[0] < self.in_shape[0] or self.new_shape[1] < self.in_shape[1]
            y = F.interpolate(y.float(), size=self.new_shape, mode="bilinear", align_corners=False,
                              antialias=shrink)
        top, left = self.pad
        bottom = self.size - self.new_shape[0] - top
        right = self.size - self.new_shape[1] - left
        y = F.pad(y, (left, right, top, bottom), value=0)
        return y.reshape(*lead, self.size, self.size)

    def valid_mask(self) -> torch.Tensor:
        """``(S, S)`` bool, True inside the resized slice, False on padding."""
        import torch

        m = torch.zeros(self.size, self.size, dtype=torch.bool)
        t, l = self.pad
        m[t:t + self.new_shape[0], l:l + self.new_shape[1]] = True
        return m

    # -- inverse -------------------------------------------------------------------------------
    def from_model(self, y: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Inverse of :meth:`to_model`: crop the padding and resize ``(..., S, S)`` back to
        ``(..., H, W)``. Use "bilinear" for probabilities/logits (then argmax), "nearest" for
        label maps."""
        import torch.nn.functional as F

        t, l = self.pad
        crop = y[..., t:t + self.new_shape[0], l:l + self.new_shape[1]]
        lead = crop.shape[:-2]
        c = crop.reshape(-1, 1, *crop.shape[-2:])
        if mode == "nearest":
            out = F.interpolate(c.float(), size=self.in_shape, mode="nearest-exact").to(y.dtype)
        else:
            out = F.interpolate(c.float(), size=self.in_shape, mode="bilinear", align_corners=False)
        return out.reshape(*lead, *self.in_shape)
