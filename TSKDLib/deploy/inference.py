"""Whole-scan inference with an exported model package: onnxruntime + SimpleITK + numpy only.

This module never imports PyTorch (nor any TSKDLib module that does), so ``tskd segment`` works
in an environment with only ``onnxruntime``, ``SimpleITK``, ``numpy`` (and ``slicerio`` for
``.seg.nrrd`` output). The intensity normalisation and the aspect-preserving resize of
:mod:`TSKDLib.data.preprocess` are re-implemented here in numpy with the same arithmetic:

* normalisation: CT window ``[level - width/2, level + width/2]`` or per-volume percentiles,
  mapped linearly to ``[0, 1]`` with clipping;
* resize to the model: separable bilinear interpolation with PyTorch's ``align_corners=False``
  sampling, antialiased (triangle filter widened by the scale, as ``F.interpolate(...,
  antialias=True)``) when shrinking, then zero padding; agreement with ``SliceResizer.to_model``
  is tested (< 1e-5);
* back to the native grid: the logits are cropped and bilinearly upsampled and their argmax
  taken. Only pixels whose 2x2 source neighbourhood mixes classes are interpolated explicitly:
  elsewhere every source pixel has the same argmax and so, by convexity, does the interpolated
  logit vector - the result equals "interpolate all logits, then argmax" exactly.

Pipeline of :func:`segment_image`: read -> check the scan's acquisition plane against the model's
(``acquisition`` models) -> exact slice frame of the model card's slice axis
(:func:`TSKDLib.data.geometry.slice_frame`: permutation and flips, no interpolation) -> slices, in batches ->
onnxruntime (CUDA provider when present, else CPU) -> labels on the native slice grid -> for
models with an intensity reference, a second pass when the scan's classes are darker or brighter
than in the training scans (:func:`standardized_range`) -> optional 3D clean-up per class
(SimpleITK: small-island removal, largest connected component, the one-object classes' misplaced
and small parts, hole filling) -> back onto the input grid (exact,
no interpolation) -> labelmap with the input's size, spacing, origin and direction. :func:`segment_file` writes it (NIfTI, NRRD, ``.seg.nrrd``) with
:func:`TSKDLib.data.io.write_labelmap`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from TSKDLib.data import geometry
from TSKDLib.data.classmap import ClassMap
from TSKDLib.errors import InputError, ModelPackageError

FORMAT = "tskd-model"
SUPPORTED_FORMAT_VERSIONS = (1,)
_REQUIRED_CARD_KEYS = ("classes", "input_size", "normalization", "slice_axis")


# ------------------------------------------------------------------------------------------------
# Model package
# ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelPackage:
    """A loaded model package (see ``docs/design.md``, "Model package").

    Attributes
    ----------
    path: package directory.
    card: the parsed ``model_card.json``.
    class_map: :class:`TSKDLib.data.classmap.ClassMap` of the K foreground classes.
    input_size: model input size S (pixels).
    slice_axis: ``acquisition``, ``axial``, ``coronal`` or ``sagittal``.
    normalization: the card's normalisation dict.
    session: the ``onnxruntime.InferenceSession``.
    """

    path: Path
    card: dict
    class_map: ClassMap
    input_size: int
    slice_axis: str
    normalization: dict
    session: object

    @property
    def num_classes(self) -> int:
        return self.class_map.num_classes

    @property
    def one_object_fraction(self) -> float:
        """The card's ``postprocessing.min_fraction`` (default :data:`ONE_OBJECT_MIN_FRACTION`)."""
        return float((self.card.get("postprocessing") or {}).get("min_fraction", ONE_OBJECT_MIN_FRACTION))

    @property
    def single_object_classes(self) -> tuple[int, ...]:
        """Class indices (1..K) that were one 3D object in the training scans (the card's
        ``postprocessing.one_object`` names): ``tskd segment`` removes their components
        smaller than a fifth of the largest (:class:`Cleanup`). Empty for packages that do not
        record it."""
        names = ((self.card.get("postprocessing") or {}).get("one_object")) or []
        return tuple(i + 1 for i, n in enumerate(self.class_map.names) if n in names)

    @property
    def class_locations(self) -> dict[int, tuple[float, float, float]]:
        """Where each one-object class lay in the training scans: class index (1..K) -> ``(x, y,
        radius)`` LPS mm, its labelled voxels' centre from the scan's centre and their RMS
        distance from it, averaged over the training scans (the card's
        ``postprocessing.locations``, ``{name: {"centre_mm": [x, y], "radius_mm": r}}``; see
        :func:`class_locations_lps`). Empty for packages that do not record it."""
        locs = (self.card.get("postprocessing") or {}).get("locations") or {}
        out = {}
        for i, name in enumerate(self.class_map.names):
            entry = locs.get(name)
            if i + 1 in self.single_object_classes and isinstance(entry, dict) and len(entry.get("centre_mm", ())) == 2:
                x, y = (float(v) for v in entry["centre_mm"])
                out[i + 1] = (x, y, float(entry.get("radius_mm", 0.0)))
        return out

    @property
    def location_margin_mm(self) -> float:
        """The card's ``postprocessing.location_margin_mm`` (default :data:`LOCATION_MARGIN_MM`)."""
        return float((self.card.get("postprocessing") or {}).get("location_margin_mm", LOCATION_MARGIN_MM))

    @property
    def intensity_reference(self) -> dict[int, float]:
        """Class index (1..K) -> the normalised intensity (0..1) typical of the class in the
        training scans: the geometric mean over the scans of the median of its labelled voxels
        (the card's ``normalization.standardize.class_medians``, one ``{name: median}`` per
        training scan, :func:`class_intensity_medians`). :func:`segment_image` scales a new
        scan's intensities towards it (:func:`intensity_factor`). Empty for window (CT)
        normalisations and for packages that do not record it; malformed entries are ignored."""
        per_scan = ((self.normalization.get("standardize") or {}).get("class_medians")) or []
        return reference_intensities(per_scan, self.class_map.names)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """``(N, 1, S, S)`` float32 in [0, 1] -> ``(N, K+1, S, S)`` float32 logits."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(["logits"], {"image": x})[0]


def default_providers() -> list[str]:
    """onnxruntime providers to use: CUDA first when the installed build has it, then CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail] or ["CPUExecutionProvider"]


_PACKAGE_FIX = "Export the model again (tskd train / tskd export), or point at a complete model package."


def _read_card(p: Path) -> dict:
    """The model card of package folder ``p``, checked: a folder, a JSON object of TSKD's format
    and a supported version, with every required key. Raises :class:`ModelPackageError`."""
    fix = _PACKAGE_FIX
    if not p.is_dir():
        raise ModelPackageError("model package folder not found.", p, fix)
    card_path = p / "model_card.json"
    if not card_path.is_file():
        raise ModelPackageError("model package has no model_card.json.", p, fix)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"model_card.json is not valid JSON ({exc}).", card_path, fix) from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModelPackageError(f"not a TSKD model card (format {card.get('format') if isinstance(card, dict) else None!r}).",
                                card_path, fix)
    if card.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelPackageError(f"model package format version {card.get('format_version')!r} is not supported "
                                f"(this TSKD reads {list(SUPPORTED_FORMAT_VERSIONS)}).", card_path,
                                "Update TSKD, or export the model with this version.")
    missing = [k for k in _REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ModelPackageError(f"model card lacks {missing}.", card_path, fix)
    return card


def _verify_checksums(p: Path, card: dict) -> None:
    """Every file the card lists (model.onnx at least) exists in ``p`` with its SHA-256.
    Raises :class:`ModelPackageError` naming the missing or corrupt file."""
    fix = _PACKAGE_FIX
    files = card.get("files") or {}
    if "model.onnx" not in files:
        raise ModelPackageError("model card lists no checksum for model.onnx.", p / "model_card.json", fix)
    for name, digest in files.items():
        f = p / name
        if not f.is_file():
            raise ModelPackageError(f"file {name} listed in the model card is missing.", p, fix)
        if _sha256(f) != digest:
            raise ModelPackageError(f"file {name} is corrupt (SHA-256 differs from the model card).", f, fix)


def load_model_package(path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                       verify: bool = True) -> ModelPackage:
    """Open and check a model package.

    Parameters
    ----------
    path:
        Package directory (``model.onnx`` + ``model_card.json``).
    providers:
        onnxruntime execution providers (default :func:`default_providers`).
    threads:
        CPU threads of onnxruntime (None: its default, one per physical core).
    verify:
        Check the SHA-256 of every file listed in the card.

    Raises
    ------
    ModelPackageError
        Missing folder or files, unreadable/invalid model card, unknown format or version,
        checksum mismatch, or an ONNX model that onnxruntime cannot load or whose inputs/outputs
        do not match the card.
    """
    p = Path(path)
    fix = _PACKAGE_FIX
    card_path = p / "model_card.json"
    card = _read_card(p)
    onnx_path = p / "model.onnx"
    if not onnx_path.is_file():
        raise ModelPackageError("model package has no model.onnx.", p, fix)
    if verify:
        _verify_checksums(p, card)
    try:
        class_map = ClassMap.from_json_dict({"classes": card["classes"],
                                             "ignored_values": card.get("ignored_values", [])})
        size = int(card["input_size"])
        axis = str(card["slice_axis"])
        if axis not in geometry.AXIS_CHOICES:
            raise ValueError(f"slice axis {axis!r}")
    except Exception as exc:  # noqa: BLE001 - any malformed entry is a package error
        raise ModelPackageError(f"model card has an invalid entry ({exc}).", card_path, fix) from None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), opts, providers=providers or default_providers())
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ModelPackageError(f"model.onnx cannot be loaded by onnxruntime ({str(exc).splitlines()[0]}).",
                                onnx_path, fix) from None
    ins = {i.name: i.shape for i in session.get_inputs()}
    outs = {o.name: o.shape for o in session.get_outputs()}
    if "image" not in ins or "logits" not in outs:
        raise ModelPackageError(f"model.onnx has inputs {list(ins)} / outputs {list(outs)}; expected image / logits.",
                                onnx_path, fix)
    k1 = outs["logits"][1]
    if isinstance(k1, int) and k1 != class_map.num_classes + 1:
        raise ModelPackageError(f"model.onnx outputs {k1} channels but the card lists {class_map.num_classes} "
                                "classes (+ background).", onnx_path, fix)
    return ModelPackage(p, card, class_map, size, axis, dict(card["normalization"]), session)


# ------------------------------------------------------------------------------------------------
# Normalisation and resizing (numpy twins of TSKDLib.data.preprocess)
# ------------------------------------------------------------------------------------------------
def fit_normalization(norm: dict, volume: np.ndarray) -> tuple[float, float]:
    """``(lo, hi)`` intensity range of the card's :class:`TSKDLib.data.preprocess.Normalization` for a
    volume (window: from width/level in HU; percentile: from this volume's percentiles), exactly
    as training computed it. Raises :class:`ModelPackageError` for an unknown kind."""
    from dataclasses import fields

    from TSKDLib.errors import ConfigError
    from TSKDLib.data.preprocess import Normalization

    known = {f.name for f in fields(Normalization)}
    try:
        fitted = Normalization(**{k: v for k, v in norm.items() if k in known}).fit(volume)
    except ConfigError as exc:
        raise ModelPackageError(f"unusable normalisation in the model card ({exc}).") from None
    return fitted.lo, fitted.hi


def apply_normalization(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip((x - lo) / (hi - lo), 0, 1)`` as float32 (same arithmetic as ``FittedNormalization``)."""
    out = (np.asarray(x, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


#: :func:`intensity_factor`: a scan whose factor lies within ``[1 / tolerance, tolerance]`` is
#: segmented as it is; the factor is clipped to :data:`INTENSITY_FACTOR_RANGE`
INTENSITY_TOLERANCE = 1.1
INTENSITY_FACTOR_RANGE = (0.4, 2.5)
#: a class takes part in :func:`intensity_factor` only with at least this volume (mm^3) predicted
INTENSITY_MIN_MM3 = 2000.0
#: :func:`intensity_factor` needs at least this many classes: one class's own intensity may be its
#: disease (a lesion, a fatty liver), several organs agreeing are the scan's scale
INTENSITY_MIN_CLASSES = 2


def class_intensity_medians(slices: np.ndarray, labels: np.ndarray, lo: float, hi: float, classes,
                            min_voxels: int = 1) -> dict[int, float]:
    """Median normalised intensity of each class's voxels.

    ``slices``: ``(N, H, W)`` intensities in the image's units; ``labels``: ``(N, H, W)`` class
    indices on the same grid (user labels, or a model's prediction); ``lo``/``hi``: the fitted
    normalisation (:func:`fit_normalization`); ``classes``: indices 1..K to measure. Returns
    ``{k: median of clip((x - lo) / (hi - lo), 0, 1) over the class's voxels}`` for the classes
    with at least ``min_voxels`` voxels (the median of the raw voxels, normalised: the map is
    monotone, so the two agree)."""
    out = {}
    for k in classes:
        mask = labels == k
        if int(np.count_nonzero(mask)) >= max(int(min_voxels), 1):
            out[int(k)] = float(apply_normalization(np.array([np.median(slices[mask])]), lo, hi)[0])
    return out


def case_class_intensities(case, norm) -> dict:
    """``{class name: median}``: the median normalised intensity (0..1) of each class's labelled
    voxels (:func:`class_intensity_medians`), the landmarks of the intensity
    standardisation ``tskd segment`` applies to new scans; {} for CT windows (HU are calibrated),
    2D images and scans without labels. ``case``: a :class:`TSKDLib.data.case.Case` (its labelled
    slices); ``norm``: the run's :class:`TSKDLib.data.preprocess.Normalization`, fitted on the
    whole scan as training does."""
    labels, idx = case.label_slices(), case.labelled_indices()
    if norm.kind != "percentile" or labels is None or not idx or case.image.GetDimension() != 3:
        return {}
    raw = case.image_slices()
    fitted = norm.fit(raw)
    names = case.class_map.names
    found = class_intensity_medians(raw[idx], labels[idx], fitted.lo, fitted.hi, range(1, len(names) + 1))
    return {names[k - 1]: round(v, 4) for k, v in found.items()}


def reference_intensities(per_scan, names) -> dict[int, float]:
    """Class index (1..K) -> the geometric mean over the training scans of the class's median
    normalised intensity (0..1). ``per_scan``: one ``{class name: median}`` per scan
    (:func:`case_class_intensities`); ``names``: the class names in index order. Entries that are
    not numbers in ``(0, 1]`` are ignored; a class no scan measured is left out."""
    out = {}
    for i, name in enumerate(names):
        values = [float(m[name]) for m in per_scan if isinstance(m, dict)
                  and isinstance(m.get(name), (int, float)) and 0.0 < float(m[name]) <= 1.0]
        if values:
            out[i + 1] = float(np.exp(np.mean(np.log(values))))
    return out


def training_intensity_factors(per_scan, names) -> list[float]:
    """Per training scan, the factor by which its normalised intensities are multiplied before
    the student learns from it, so that its classes look as bright as in the other training
    scans: :func:`intensity_factor` of the scan's class medians against their geometric mean
    over the scans (:func:`reference_intensities`), every factor applied (no tolerance).

    ``per_scan``: one ``{class name: median}`` per training scan (:func:`case_class_intensities`,
    ``cases.json``'s ``class_intensity_medians``; {} for CT and 2D images); ``names``: the class
    names in index order. Returns one factor per scan, 1.0 for scans with fewer than
    :data:`INTENSITY_MIN_CLASSES` measured classes, and all 1.0 when fewer than two scans are
    measured (a single scan is its own reference).

    Why: the landmark standardisation is applied to every image, training and test, as Nyul and
    Udupa (1999) do; three CHAOS MR training scans differ among themselves by factors of
    0.66-1.52, and a student trained on standardised scans, with :func:`segment_image`
    standardising new scans to the same reference, reaches 0.862 on new scans against 0.854 (nine
    runs), with no organ below 0.70 in 8 runs of 9 against 6 and a seed SD of at most 0.028 per
    rotation against 0.031 (benchmarks/RESULTS.md, section 6, fifteenth pass)."""
    measured = [{i + 1: float(m[n]) for i, n in enumerate(names) if isinstance(m, dict)
                 and isinstance(m.get(n), (int, float)) and 0.0 < float(m[n]) <= 1.0} for m in per_scan]
    if sum(len(m) >= INTENSITY_MIN_CLASSES for m in measured) < 2:
        return [1.0] * len(per_scan)
    reference = reference_intensities(per_scan, names)
    return [intensity_factor(reference, m, tolerance=1.0) for m in measured]


def standardized_medians(per_scan, factors) -> list[dict]:
    """The class medians of each training scan after its factor (:func:`training_intensity_factors`):
    ``{name: min(median * factor, 1)}`` per scan, rounded to 4 decimals: what the student saw,
    hence the reference :func:`segment_image` standardises new scans to."""
    return [{k: round(min(float(v) * float(f), 1.0), 4) for k, v in (m or {}).items()
             if isinstance(v, (int, float))} for m, f in zip(per_scan, factors)]


def intensity_factor(reference: dict[int, float], measured: dict[int, float],
                     tolerance: float = INTENSITY_TOLERANCE) -> float:
    """The factor by which a scan's normalised intensities are multiplied so that its classes
    look as bright as in the training scans (1.0: leave the scan as it is).

    ``reference``: class -> typical normalised intensity in the training scans
    (:attr:`ModelPackage.intensity_reference`); ``measured``: class -> the scan's own median
    (:func:`class_intensity_medians` of a first prediction). The factor is the median over the
    classes present in both of ``reference / measured``, taken geometrically (the median keeps
    one misplaced class from steering it), clipped to :data:`INTENSITY_FACTOR_RANGE`; within
    ``[1 / tolerance, tolerance]``, or with fewer than :data:`INTENSITY_MIN_CLASSES` classes in
    common, it is 1.0.

    Why: percentile normalisation (0.5 / 99.5 %) maps a scan's brightest voxels to 1. On T2 MR
    a large fluid-bright lesion raises that percentile and darkens every organ: CHAOS scan 36's
    organs sit at 0.2-0.5 where the training scans' sit at 0.35-0.95, and a student trained on
    three other scans misses half its kidneys (benchmarks/RESULTS.md, section 6, thirteenth
    pass). Using tissues of known kind as intensity landmarks is the idea of Nyul and Udupa's
    standardisation (Magn Reson Med 42:1072, 1999) and of WhiteStripe (Shinohara et al.,
    NeuroImage: Clinical 6:9, 2014); here the landmarks are the model's own classes, found by
    a first prediction."""
    ratios = [math.log(reference[k] / measured[k]) for k in sorted(set(reference) & set(measured))
              if reference[k] > 0 and measured[k] > 1e-6]
    if len(ratios) < INTENSITY_MIN_CLASSES:
        return 1.0
    lo, hi = INTENSITY_FACTOR_RANGE
    factor = min(max(math.exp(float(np.median(ratios))), lo), hi)
    return 1.0 if abs(math.log(factor)) <= math.log(tolerance) else factor


def standardized_range(pkg: ModelPackage, slices: np.ndarray, lo: float, hi: float, labels: np.ndarray,
                       voxel_mm3: float) -> tuple[float, float, float]:
    """``(lo, hi, factor)``: the normalisation range with which a scan is segmented again so that
    its classes' intensities match the training scans' (:func:`intensity_factor`; ``hi`` becomes
    ``lo + (hi - lo) / factor``, the same as multiplying the normalised image by ``factor``).
    ``slices``/``labels``: ``(N, H, W)`` the scan and a first prediction on it (before any
    clean-up); ``voxel_mm3``: one voxel's volume. ``factor`` is 1.0 (range unchanged) for
    packages without :attr:`ModelPackage.intensity_reference`, for 2D images, and for scans
    within the tolerance (the card's ``normalization.standardize.tolerance``, default
    :data:`INTENSITY_TOLERANCE`)."""
    reference = pkg.intensity_reference
    if not reference or slices.shape[0] < 2:
        return lo, hi, 1.0
    measured = class_intensity_medians(slices, labels, lo, hi, reference,
                                       min_voxels=math.ceil(INTENSITY_MIN_MM3 / max(voxel_mm3, 1e-9)))
    tolerance = float((pkg.normalization.get("standardize") or {}).get("tolerance", INTENSITY_TOLERANCE))
    factor = intensity_factor(reference, measured, tolerance)
    return lo, (hi if factor == 1.0 else lo + (hi - lo) / factor), factor


def _taps(n_in: int, n_out: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sampling taps ``(index (n_out, T), weight (n_out, T))`` of PyTorch's 1D bilinear resize
    (``align_corners=False``; with ``antialias`` the ``_upsample_bilinear2d_aa`` kernel)."""
    scale = n_in / n_out
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        t = int(np.ceil(support)) * 2 + 1
        idx = np.zeros((n_out, t), np.int64)
        w = np.zeros((n_out, t), np.float64)
        for i in range(n_out):
            center = scale * (i + 0.5)
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), n_in)
            js = np.arange(xmin, xmax)
            ww = np.clip(1.0 - np.abs((js - center + 0.5) * invscale), 0.0, None)
            s = ww.sum()
            ww = ww / s if s > 0 else ww
            idx[i, :len(js)] = js
            w[i, :len(js)] = ww
        return idx, w.astype(np.float32)
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = src.astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    lam = src - i0
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return np.stack([i0, i1], 1), np.stack([1.0 - lam, lam], 1).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """Dense ``(n_out, n_in)`` float32 interpolation matrix of :func:`_taps` (BLAS-friendly)."""
    idx, w = _taps(n_in, n_out, antialias)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.repeat(np.arange(n_out), idx.shape[1])
    np.add.at(m, (rows, idx.ravel()), w.ravel())
    return m


@dataclass(frozen=True)
class NumpyResizer:
    """numpy twin of :class:`TSKDLib.data.preprocess.SliceResizer` (same geometry and arithmetic).

    Attributes: ``in_shape (H, W)``, ``size`` S, ``new_shape (h, w)``, ``pad (top, left)``."""

    in_shape: tuple[int, int]
    size: int
    new_shape: tuple[int, int]
    pad: tuple[int, int]

    @classmethod
    def create(cls, in_shape, size: int, spacing=(1.0, 1.0)) -> "NumpyResizer":
        """The geometry of ``SliceResizer.create`` (one rule for training and inference): the
        longer physical side fills S, symmetric padding."""
        from TSKDLib.data.preprocess import SliceResizer  # torch-free at import

        r = SliceResizer.create(in_shape, size, spacing)
        return cls(r.in_shape, r.size, r.new_shape, r.pad)

    def to_model(self, slices: np.ndarray) -> np.ndarray:
        """``(n, H, W)`` float32 -> ``(n, S, S)`` float32 (bilinear, antialiased when shrinking, zero pad)."""
        shrink = self.new_shape[0] < self.in_shape[0] or self.new_shape[1] < self.in_shape[1]
        x = np.asarray(slices, dtype=np.float32)
        if tuple(self.new_shape) != tuple(self.in_shape):
            # separable: columns then rows, as two matrix products
            x = np.matmul(x, _resize_matrix(self.in_shape[1], self.new_shape[1], shrink).T)
            x = np.matmul(_resize_matrix(self.in_shape[0], self.new_shape[0], shrink), x)
        out = np.zeros((x.shape[0], self.size, self.size), np.float32)
        t, l = self.pad
        out[:, t:t + self.new_shape[0], l:l + self.new_shape[1]] = x
        return out

    def labels_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """``(n, C, S, S)`` logits -> ``(n, H, W)`` uint8/uint16 argmax of the bilinearly resized
        logits on the native grid (equal to ``SliceResizer.from_model`` then argmax)."""
        t, l = self.pad
        crop = logits[:, :, t:t + self.new_shape[0], l:l + self.new_shape[1]]
        n, c = crop.shape[:2]
        dtype = np.uint8 if c <= 256 else np.uint16
        low = np.argmax(crop, axis=1).astype(dtype)  # (n, h, w)
        ri, rw = _taps(self.new_shape[0], self.in_shape[0], False)
        ci, cw = _taps(self.new_shape[1], self.in_shape[1], False)
        rows = low[:, ri[:, 0]]
        rows1 = low[:, ri[:, 1]]
        a00, a01 = rows[:, :, ci[:, 0]], rows[:, :, ci[:, 1]]
        a10, a11 = rows1[:, :, ci[:, 0]], rows1[:, :, ci[:, 1]]
        out = a00
        mixed = (a00 != a01) | (a00 != a10) | (a00 != a11)
        if mixed.any():
            b, y, x = np.nonzero(mixed)
            r0, r1, c0, c1 = ri[y, 0], ri[y, 1], ci[x, 0], ci[x, 1]
            wr0, wr1, wc0, wc1 = rw[y, 0, None], rw[y, 1, None], cw[x, 0, None], cw[x, 1, None]
            v = (crop[b, :, r0, c0] * (wr0 * wc0) + crop[b, :, r0, c1] * (wr0 * wc1)
                 + crop[b, :, r1, c0] * (wr1 * wc0) + crop[b, :, r1, c1] * (wr1 * wc1))
            out = out.copy()
            out[b, y, x] = np.argmax(v, axis=1).astype(dtype)
        return out


# ------------------------------------------------------------------------------------------------
# 3D clean-up
# ------------------------------------------------------------------------------------------------
#: One-object classes: components smaller than this fraction of the class's largest are removed
#: (benchmarks/RESULTS.md, section 6; :class:`Cleanup`).
ONE_OBJECT_MIN_FRACTION = 0.2

#: One-object classes: a part whose centre (LPS x, y) lies farther from where the class lay in
#: the training scans than the best-placed part's by more than this, or by more than
#: :data:`LOCATION_RADII` times the class's radius if that is more, is removed (:class:`Cleanup`).
#: On CHAOS MR the training scans' organ centres spread by 10-25 mm about their mean and a left
#: and a right organ lie 110-160 mm apart; a liver's radius is 50-70 mm, so a liver part as far
#: off as its left lobe stays (benchmarks/RESULTS.md, section 6, twelfth pass).
LOCATION_MARGIN_MM = 60.0
LOCATION_RADII = 2.0
#: The best-placed part (:data:`LOCATION_MARGIN_MM`) is sought among parts of at least this
#: fraction of the class's largest: on CHAOS scan 36 the real right kidney was found as a part a
#: fifth the size of a misplaced one (benchmarks/RESULTS.md, section 6, twelfth pass).
LOCATION_ANCHOR_FRACTION = 0.05
#: One-object classes: removed parts at least this large (mm^3) may join the class they touch
#: (:class:`Cleanup`, ``reassign_parts``); smaller ones stay removed.
REASSIGN_MIN_MM3 = 1000.0


def class_locations_lps(labels: np.ndarray, geometry_of: geometry.ArrayGeometry, classes,
                        slices=None) -> dict[int, tuple[float, float, float]]:
    """Where each class lies in the patient's cross-section, whatever the slice orientation:
    ``(x, y, radius)`` in LPS mm, the centre of the class's voxels (patient left, posterior) from
    the scan's centre and their root-mean-square distance from it in the x-y plane (the S-I
    position is left out: it depends on where the field of view starts).

    ``labels``: ``(Z, Y, X)`` class indices ``0..K`` with ``geometry_of``
    (:class:`TSKDLib.data.geometry.ArrayGeometry`); ``slices``: optional indices along axis 0 to
    use (the labelled slices). Classes absent from those voxels are left out."""
    out = {}
    sub = labels if slices is None else labels[np.asarray(slices, dtype=int)]
    index = np.arange(len(labels)) if slices is None else np.asarray(slices, dtype=int)
    for k in classes:
        z, y, x = np.nonzero(sub == k)
        if len(z):
            xy = geometry_of.offsets_lps(np.stack([index[z], y, x], axis=1))[:, :2]
            centre = xy.mean(axis=0)
            radius = float(np.sqrt(((xy - centre) ** 2).sum(axis=1).mean()))
            out[int(k)] = (float(centre[0]), float(centre[1]), radius)
    return out


def mean_class_locations(per_scan, classes) -> dict:
    """Where each of ``classes`` lay over several training scans: the mean ``(x, y, radius)``
    (LPS mm) over the scans' :func:`class_locations_lps` results ``per_scan`` (a sequence of
    ``{class: (x, y, radius)}``, keyed by index or name alike) that hold it; a class none holds is
    left out. This is what ``tskd train`` records in the model card (``postprocessing.locations``)."""
    return {k: tuple(float(v) for v in np.mean([p[k] for p in per_scan if k in p], axis=0))
            for k in classes if any(k in p for p in per_scan)}


@dataclass
class Cleanup:
    """Per-class 3D post-processing (SimpleITK), applied in this order.

    Attributes
    ----------
    min_island_mm3:
        Remove connected components (6-connected) smaller than this volume in mm^3 (0: off).
    largest_component:
        Keep only the largest connected component of each class.
    single_object:
        Class indices (1..K) of the model's one-object classes
        (:attr:`ModelPackage.single_object_classes`): their misplaced components are removed
        (``locations``), then those smaller than ``single_object_fraction`` of the largest left.
    single_object_fraction:
        0.2: on CHAOS MR (3 training scans, scans 34 and 36) this removed the false organs without
        the losses of keeping the largest component alone, which kept a false kidney or spleen
        when the model painted one larger than the real organ on a new scan (other scans: raw
        0.595, largest component 0.523, 0.1 or 0.2 of the largest 0.610, 0.5 0.587; within the
        training scans 0.879 raw, 0.893 for all three; benchmarks/RESULTS.md, section 6).
    locations:
        One-object class index -> ``(x, y, radius)`` LPS mm: where the class lay in the training
        scans, from the scan's centre, and its radius there (:attr:`ModelPackage.class_locations`).
        When such a class has several parts, those whose centre lies farther from ``(x, y)``
        than the best-placed part's by more than ``max(location_margin_mm, LOCATION_RADII x
        radius)`` are removed before the size rule, which then compares the parts left with the
        largest of them (the best-placed part, sought among parts of at least
        :data:`LOCATION_ANCHOR_FRACTION` of the largest, always stays). Needs the labels'
        ``geometry_of`` in :func:`cleanup_labels`. This removes what the size rule cannot: a
        false organ larger than the real one, far from where the organ lies (CHAOS MR, a new
        scan with a large fluid-bright mass on the patient's left: a "right kidney" lateral to
        it, a "liver" beside it; benchmarks/RESULTS.md, section 6, twelfth pass).
    location_margin_mm:
        The smallest margin, :data:`LOCATION_MARGIN_MM`.
    reassign_parts:
        With ``locations``: a part of at least :data:`REASSIGN_MIN_MM3` that the rules above
        removed from a one-object class, that touches (6-connected) the kept body of another
        one-object class and whose centre lies within that class's reach of where it lay in
        training (``max(location_margin_mm, LOCATION_RADII x radius)``), is given to that class
        (the one it touches most), then the clean-up runs once more. The student sometimes names
        a stretch of one organ as another: on CHAOS MR, a new scan's spleen painted "right kidney"
        on three of its slices (Dice 0.62 with those slices removed, 0.82 given back; nine runs,
        new scans 0.862 -> 0.866, no run's lowest organ lower; benchmarks/RESULTS.md, section 6,
        sixteenth pass).
    fill_holes:
        Fill cavities fully enclosed by a class (``BinaryFillhole``, 3D) where they are background.
    """

    min_island_mm3: float = 0.0
    largest_component: bool = False
    fill_holes: bool = False
    single_object: tuple[int, ...] = ()
    single_object_fraction: float = ONE_OBJECT_MIN_FRACTION
    locations: dict = field(default_factory=dict)
    location_margin_mm: float = LOCATION_MARGIN_MM
    reassign_parts: bool = True

    @classmethod
    def segment_default(cls, single_object: tuple[int, ...] = (),
                        single_object_fraction: float = ONE_OBJECT_MIN_FRACTION,
                        largest_component: bool = False, locations: dict | None = None,
                        location_margin_mm: float = LOCATION_MARGIN_MM) -> "Cleanup":
        """The clean-up ``tskd segment`` applies unless ``--no-cleanup``: islands under 50 mm^3
        removed, enclosed holes filled, and the one-object classes' small and misplaced parts
        removed (the sparse-slice benchmark's ``+post`` scores use it too)."""
        return cls(min_island_mm3=50.0, largest_component=largest_component, fill_holes=True,
                   single_object=tuple(single_object), single_object_fraction=single_object_fraction,
                   locations=dict(locations or {}), location_margin_mm=location_margin_mm)

    @classmethod
    def for_package(cls, pkg: ModelPackage, all_components: bool = False,
                    largest_component: bool = False) -> Cleanup:
        """:meth:`segment_default` with the model card's one-object classes, their minimum
        fraction and their training locations (``all_components``: none of them)."""
        if all_components:
            return cls.segment_default(largest_component=largest_component)
        return cls.segment_default(pkg.single_object_classes, pkg.one_object_fraction, largest_component,
                                   pkg.class_locations, pkg.location_margin_mm)

    @property
    def active(self) -> bool:
        return self.min_island_mm3 > 0 or self.largest_component or self.fill_holes or bool(self.single_object)

    def to_dict(self) -> dict:
        return {"min_island_mm3": self.min_island_mm3, "largest_component": self.largest_component,
                "fill_holes": self.fill_holes, "single_object": list(self.single_object),
                "single_object_fraction": self.single_object_fraction,
                "locations": {int(k): list(v) for k, v in self.locations.items()},
                "location_margin_mm": self.location_margin_mm, "reassign_parts": self.reassign_parts}


def cleanup_labels(labels: np.ndarray, num_classes: int, spacing_zyx=(1.0, 1.0, 1.0),
                   options: Cleanup | None = None, geometry_of: geometry.ArrayGeometry | None = None) -> np.ndarray:
    """Clean a 3D labelmap per class.

    Parameters
    ----------
    labels:
        ``(Z, Y, X)`` uint8/uint16 class indices ``0..K`` (modified copy returned).
    spacing_zyx:
        Voxel size in mm along the array axes (for ``min_island_mm3``).
    options:
        :class:`Cleanup`; None or inactive returns ``labels`` unchanged.
    geometry_of:
        Where ``labels``' voxels lie (:class:`TSKDLib.data.geometry.ArrayGeometry`); needed by
        ``options.locations`` (without it, no part is removed for its place).

    Each class is processed inside its bounding box: removed voxels become background; filled
    holes take the class only where they were background. Removed one-object parts may then join
    the one-object class they touch (``options.reassign_parts``).
    """
    opts = options or Cleanup()
    if not opts.active:
        return labels
    out = labels.copy()
    voxel_mm3 = float(np.prod(spacing_zyx))
    min_vox = int(np.ceil(opts.min_island_mm3 / voxel_mm3)) if opts.min_island_mm3 > 0 else 0
    for k in range(1, num_classes + 1):
        mask = out == k
        if not mask.any():
            continue
        sl = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            nz = np.flatnonzero(mask.any(axis=other))
            sl.append(slice(max(nz[0] - 1, 0), nz[-1] + 2))
        sl = tuple(sl)
        sub = mask[sl].astype(np.uint8)
        img = sitk.GetImageFromArray(sub)
        img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
        keep = img
        one_object = k in opts.single_object and not opts.largest_component
        if min_vox or opts.largest_component or one_object:
            cc = sitk.ConnectedComponent(img, False)
            cc = sitk.RelabelComponent(cc, minimumObjectSize=min_vox, sortByObjectSize=True)
            if opts.largest_component:
                keep = cc == 1
            elif one_object:  # misplaced parts out; of the rest, those >= fraction x the largest
                sizes = np.bincount(sitk.GetArrayViewFromImage(cc).ravel())[1:]
                kept = list(range(1, len(sizes) + 1))
                if len(sizes) > 1 and k in opts.locations and geometry_of is not None:
                    kept = _well_placed(cc, sizes, [s.start for s in sl], geometry_of, opts.locations[k],
                                        opts.location_margin_mm)
                if kept:
                    largest = max(sizes[c - 1] for c in kept)
                    kept = [c for c in kept if sizes[c - 1] >= opts.single_object_fraction * largest]
                keep = _components(cc, kept)
            else:
                keep = cc > 0
        if opts.fill_holes:
            keep = sitk.BinaryFillhole(sitk.Cast(keep, sitk.sitkUInt8), fullyConnected=False, foregroundValue=1)
        new = sitk.GetArrayViewFromImage(keep).astype(bool)
        region = out[sl]
        region[(region == k) & ~new] = 0
        region[new & (region == 0)] = k
    if (opts.reassign_parts and opts.locations and opts.single_object and geometry_of is not None
            and not opts.largest_component and _reassign_parts(labels, out, voxel_mm3, opts, geometry_of)):
        out = cleanup_labels(out, num_classes, spacing_zyx, replace(opts, reassign_parts=False), geometry_of)
    return out


def _reassign_parts(labels: np.ndarray, out: np.ndarray, voxel_mm3: float, opts: Cleanup,
                    geometry_of: geometry.ArrayGeometry) -> int:
    """Give the one-object parts that the clean-up removed (``labels`` -> ``out``, both
    ``(Z, Y, X)``) to the one-object class whose kept body they touch most, where they lie
    within that class's reach (:class:`Cleanup`, ``reassign_parts``). ``out`` is changed in
    place; returns the number of parts given."""
    clean = out.copy()
    min_vox = max(int(np.ceil(REASSIGN_MIN_MM3 / voxel_mm3)), 1)
    owners = [j for j in opts.single_object if j in opts.locations]
    if not owners:
        return 0
    given = 0
    for k in opts.single_object:
        removed = (labels == k) & (clean == 0)
        if removed.sum() < min_vox:
            continue
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(removed.astype(np.uint8)), False),
                                   minimumObjectSize=min_vox)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(cc)  # unit spacing, zero origin: centroids and boxes in voxel indices
        comp = sitk.GetArrayViewFromImage(cc)
        for c in stats.GetLabels():
            x0, y0, z0, nx, ny, nz = stats.GetBoundingBox(c)
            box = tuple(slice(max(a - 1, 0), a + n + 1) for a, n in ((z0, nz), (y0, ny), (x0, nx)))
            part = comp[box] == c
            grown = sitk.BinaryDilate(sitk.GetImageFromArray(part.astype(np.uint8)), [1, 1, 1], sitk.sitkCross)
            ring = sitk.GetArrayFromImage(grown).astype(bool) & ~part
            touch = np.bincount(clean[box][ring].ravel(), minlength=max(owners) + 1)
            near = [j for j in owners if j != k and touch[j] > 0]
            if not near:
                continue
            j = max(near, key=lambda j: touch[j])
            centre = np.array([stats.GetCentroid(c)[::-1]])
            loc = opts.locations[j]
            if (np.linalg.norm(geometry_of.offsets_lps(centre)[0, :2] - np.asarray(loc[:2], float))
                    <= _reach(loc, opts.location_margin_mm)):
                out[box][part] = j
                given += 1
    return given


def _components(cc: sitk.Image, labels: list[int]) -> sitk.Image:
    """Mask of the connected components ``labels`` of the label image ``cc``."""
    if labels == list(range(1, len(labels) + 1)):
        return (cc > 0) & (cc <= len(labels))
    arr = np.isin(sitk.GetArrayViewFromImage(cc), labels).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(cc)
    return out


def _well_placed(cc: sitk.Image, sizes: np.ndarray, start_zyx, geometry_of, location, margin_mm: float) -> list[int]:
    """The components of ``cc`` (labels ``1..len(sizes)``, ``sizes`` voxels each; a sub-block
    starting at ``start_zyx`` of an array with ``geometry_of``) whose centre (LPS x, y) is at most
    ``margin_mm`` farther from ``location`` than the best-placed part's, or ``LOCATION_RADII``
    times the location's radius if that is more (:class:`Cleanup`, ``locations``: ``location`` is
    ``(x, y[, radius])``). The best-placed part is sought among the parts of at least
    :data:`LOCATION_ANCHOR_FRACTION` of the largest, so a speck cannot set it."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    img = sitk.Image(cc)
    img.SetSpacing((1.0, 1.0, 1.0))  # centroids in (x, y, z) voxel indices of the block
    stats.Execute(img)
    n = len(sizes)
    centres = np.array([stats.GetCentroid(c)[::-1] for c in range(1, n + 1)]) + np.asarray(start_zyx, float)
    dist = np.linalg.norm(geometry_of.offsets_lps(centres)[:, :2] - np.asarray(location[:2], float), axis=1)
    margin = _reach(location, margin_mm)
    best = dist[np.asarray(sizes) >= LOCATION_ANCHOR_FRACTION * max(sizes)].min()
    return [c for c in range(1, n + 1) if dist[c - 1] <= best + margin]


def _reach(location, margin_mm: float) -> float:
    """How far (mm) from a one-object class's ``location`` ``(x, y[, radius])`` its parts may lie:
    ``max(margin_mm, LOCATION_RADII x radius)``, or ``margin_mm`` without a radius."""
    return max(margin_mm, LOCATION_RADII * float(location[2])) if len(location) > 2 else margin_mm


# ------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------
def _as_package(model) -> ModelPackage:
    return model if isinstance(model, ModelPackage) else load_model_package(model)


def check_acquisition_plane(pkg: ModelPackage, img: sitk.Image, source=None) -> None:
    """Refuse a scan acquired in another plane than the model's training scans.

    Applies to models with slice axis ``acquisition`` whose card records the training scans'
    slice normals (``acquisition.directions``, LPS unit vectors): the scan's slice normal
    (:func:`TSKDLib.data.geometry.stacking_direction`) must be within
    :data:`TSKDLib.data.geometry.PLANE_MATCH_DEG` (45 degrees) of one of them. Models with a named
    axis (axial/coronal/sagittal) slice any scan along that patient axis, unchecked.

    Raises :class:`InputError` naming both planes and the fix (no resampling is done)."""
    acq = pkg.card.get("acquisition") or {}
    dirs = acq.get("directions") or []
    if pkg.slice_axis != "acquisition" or not dirs or img.GetDimension() != 3:
        return
    v = geometry.stacking_direction(img)
    angle = min(geometry.plane_angle_deg(v, d) for d in dirs)
    if angle > geometry.PLANE_MATCH_DEG:
        planes = ", ".join(sorted(set(acq.get("planes") or []))) or "?"
        raise InputError(f"the scan was acquired in the {geometry.acquisition_plane(img)} plane "
                         f"(slice normal {np.round(v, 3).tolist()} LPS), {angle:.0f} degrees from the "
                         f"model's training scans ({planes} acquisitions); the model sees its own "
                         "acquisition plane only and TSKD does not resample.", source,
                         "Segment scans acquired in the model's plane, or train a model on such scans "
                         "(or with an explicit --axis axial/coronal/sagittal for near-isotropic scans).")


def _scalar_volume(image) -> sitk.Image:
    """A float32 scalar volume from a SimpleITK image (2D -> one-slice volume) or a path read by
    :func:`TSKDLib.data.io.read_image`. Raises :class:`InputError` for a multi-component image."""
    if isinstance(image, sitk.Image):
        from TSKDLib.data.io import as_volume

        img = as_volume(image)
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("image has several components per voxel; a scalar image is needed.")
        return sitk.Cast(img, sitk.sitkFloat32) if img.GetPixelID() != sitk.sitkFloat32 else img
    from TSKDLib.data.io import read_image

    img, _ = read_image(image)
    return img


@dataclass
class SliceReview:
    """Where a segmentation most likely needs correcting, slice by slice (filled by :func:`segment_image`).

    The student's own estimate of how much it got wrong on each slice, for choosing the few
    slices a user corrects before ``tskd update`` (issue 15: a new scan that a model fails on is
    fixed by correcting about three of its slices; benchmarks/RESULTS.md, section 6, "Tenth
    pass": on six new CHAOS MR scans its rank correlation with the true wrong area per slice is
    0.75-0.83 on four, where the three slices it names hold 94-103 % of the error of the three
    worst, 0.49 and -0.15 on the other two; the mean entropy ranked no better on any, the area
    the 3D clean-up changed worse; correcting the named slices and ``tskd update`` gave 0.89 mean
    Dice on the other slices over eight runs, correcting the three worst 0.88).

    Attributes (one entry per slice, in the slice frame's order, i.e. from the first slice along
    the model's slice axis towards +L/+P/+S; ``N`` slices):

    file_slices:
        ``(N,)`` int, the file's own slice index (ITK i/j/k index along the slice axis, as
        ``--labelled-slices`` and ``tskd update --slices`` take them) of each entry.
    uncertain_mm2:
        ``(N,)`` float, expected misclassified area in mm^2 under the model's own probabilities
        (before the clean-up): the sum over the slice's model-grid pixels (padding excluded) of
        ``1 - max_c softmax``, times the native area one model pixel covers; for a calibrated
        model, the expected wrong area (Guo et al., ICML 2017, on confidence calibration).
    """

    file_slices: np.ndarray
    uncertain_mm2: np.ndarray

    def worst(self, n: int = 3, gap: int = 3, exclude=()) -> list[int]:
        """The file's slice indices of the ``n`` slices with the highest :attr:`uncertain_mm2`,
        each at least ``gap`` slices from the others (neighbours carry the same information),
        highest first, never one of ``exclude`` (file slice indices: slices already corrected).
        Fewer when the scan has fewer slices."""
        skip = {int(k) for k in exclude}
        order = np.argsort(-self.uncertain_mm2, kind="stable")
        chosen: list[int] = []
        for s in order:
            if len(chosen) == n:
                break
            if int(self.file_slices[s]) not in skip and all(abs(int(s) - c) >= gap for c in chosen):
                chosen.append(int(s))
        return [int(self.file_slices[s]) for s in chosen]


def uncertain_area_mm2(logits: np.ndarray, resizer: NumpyResizer, native_pixel_mm2: float) -> np.ndarray:
    """Per slice, the area the model expects to have wrong under its own probabilities.

    ``logits``: ``(n, C, S, S)`` model logits (model grid, padded as ``resizer`` pads);
    ``native_pixel_mm2``: the area in mm^2 of one pixel of the slice's own grid (row spacing x
    column spacing). Returns ``(n,)`` float: the sum over the non-padded model pixels of
    ``1 - max_c softmax``, times the native area one model pixel covers (mm^2). The score of
    :class:`SliceReview` (``tskd segment``'s slices to check) and of the Slicer module's
    "Label next"; for a calibrated model it is the expected misclassified area (Guo et al., ICML
    2017, on confidence calibration)."""
    (t, l), (h, w) = resizer.pad, resizer.new_shape
    pixel_mm2 = native_pixel_mm2 * (resizer.in_shape[0] / h) * (resizer.in_shape[1] / w)  # one model pixel
    crop = logits[:, :, t:t + h, l:l + w].astype(np.float32)
    z = np.exp(crop - crop.max(axis=1, keepdims=True)).sum(axis=1)  # (n, h, w); max softmax = 1 / z
    return (1.0 - 1.0 / z).reshape(len(z), -1).sum(1) * pixel_mm2


def predict_slices(pkg: ModelPackage, slices: np.ndarray, resizer: NumpyResizer, lo: float, hi: float,
                   batch_size: int, pixel_mm2: float, with_review: bool, progress,
                   message: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's labels of a stack of slices, as :func:`segment_image` predicts them.

    ``slices``: ``(N, H, W)`` intensities in the image's units on the native slice grid,
    normalised with ``lo``/``hi`` (:func:`apply_normalization`), resized by ``resizer`` and run in
    batches of ``batch_size``. Returns ``(labels, uncertain)``: ``(N, H, W)`` class indices (uint8,
    uint16 if K >= 255) on the native grid, and when ``with_review`` each slice's expected wrong
    area in mm^2 (:func:`uncertain_area_mm2`, ``pixel_mm2`` the native pixel area; else None).
    ``progress.update`` per batch with ``message``."""
    n = slices.shape[0]
    out = np.zeros(slices.shape, np.uint8 if pkg.num_classes < 255 else np.uint16)
    uncertain = np.zeros(n) if with_review else None
    starts = list(range(0, n, batch_size))

    def model_input(start: int) -> np.ndarray:
        return resizer.to_model(apply_normalization(slices[start:start + batch_size], lo, hi))[:, None]

    # Software pipeline: onnxruntime runs batch i in a worker thread (it releases the GIL) while
    # this thread prepares batch i+1 and maps batch i-1 back to the native grid. Same operations
    # in the same order per batch as a plain loop, so the labels do not change.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(pkg.predict_logits, model_input(starts[0])) if starts else None
        for i, start in enumerate(starts):
            logits = pending.result()
            nxt = starts[i + 1] if i + 1 < len(starts) else None
            pending = pool.submit(pkg.predict_logits, model_input(nxt)) if nxt is not None else None
            out[start:start + logits.shape[0]] = resizer.labels_from_logits(logits)
            if uncertain is not None:
                uncertain[start:start + logits.shape[0]] = uncertain_area_mm2(logits, resizer, pixel_mm2)
            if progress is not None:
                progress.update(min(start + batch_size, n), message=message)
    return out, uncertain


def segment_image(model, image, batch_size: int = 8, cleanup: Cleanup | None = None,
                  progress=None, timings: dict | None = None, review: dict | None = None) -> sitk.Image:
    """Segment a whole scan with a model package.

    Parameters
    ----------
    model:
        A :class:`ModelPackage` or a package directory.
    image:
        A SimpleITK image (2D or 3D scalar) or a path readable by :func:`TSKDLib.data.io.read_image`
        (volume file, DICOM folder, PNG/JPEG).
    batch_size:
        Slices per onnxruntime call.
    cleanup:
        Optional :class:`Cleanup` (3D, per class).
    progress:
        Optional :class:`TSKDLib.pipeline.progress.ProgressReporter`; ``update`` per batch (the caller
        opens the ``segment`` stage).
    timings:
        If a dict is given, seconds spent per step (``read``, ``infer``, ``cleanup``) are stored.
    review:
        If a dict is given, ``review["slices"]`` receives a :class:`SliceReview` (one softmax per
        batch) and ``review["intensity_factor"]`` the intensity standardisation's factor (1.0: none).

    A package that records its training scans' class intensities
    (:attr:`ModelPackage.intensity_reference`: MR and ultrasound models trained by ``tskd train``)
    segments a 3D scan twice when the first prediction's classes are darker or brighter than
    in the training scans by more than :data:`INTENSITY_TOLERANCE`: the second time with the
    intensities scaled by :func:`intensity_factor` (:func:`standardized_range`).

    Returns
    -------
    sitk.Image
        uint8 (uint16 if K >= 255) class indices ``0..K`` with the input image's exact size,
        spacing, origin and direction (3D; a 2D input gives a one-slice volume as
        :func:`TSKDLib.data.io.read_image` does).

    Raises
    ------
    ModelPackageError, InputError
    """
    pkg = _as_package(model)
    tm = timings if timings is not None else {}
    t0 = time.perf_counter()
    img = _scalar_volume(image)
    check_acquisition_plane(pkg, img, None if isinstance(image, sitk.Image) else image)
    frame = geometry.slice_frame(img, pkg.slice_axis)
    fsx, fsy, fsz = [float(img.GetSpacing()[a]) for a in frame.perm]  # (W, H, N) spacing
    slices = frame.to_array(sitk.GetArrayViewFromImage(img))  # view (N, H, W)
    lo, hi = fit_normalization(pkg.normalization, slices)
    resizer = NumpyResizer.create(slices.shape[1:], pkg.input_size, (fsy, fsx))
    tm["read"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = slices.shape[0]

    def infer(lo: float, hi: float, message: str) -> tuple[np.ndarray, np.ndarray | None]:
        return predict_slices(pkg, slices, resizer, lo, hi, batch_size, fsy * fsx, review is not None,
                              progress, message)

    out, uncertain = infer(lo, hi, "segmenting")
    # intensity standardisation: a scan whose classes came out darker or brighter than in the
    # training scans is segmented again with its intensities scaled to theirs
    lo2, hi2, factor = standardized_range(pkg, slices, lo, hi, out, fsx * fsy * fsz)
    if factor != 1.0:
        out, uncertain = infer(lo2, hi2, f"segmenting again, intensities x{factor:.2f}")
    tm["infer"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    if cleanup is not None and cleanup.active:
        out = cleanup_labels(out, pkg.num_classes, (fsz, fsy, fsx), cleanup, frame.frame_geometry(img))
    if review is not None:
        review["slices"] = SliceReview(np.array([frame.frame_to_file_slice(i) for i in range(n)]), uncertain)
        review["intensity_factor"] = factor
    result = frame.to_original(out, img)
    tm["cleanup"] = time.perf_counter() - t2
    return result


def segment_file(model, image, output, overwrite: bool = False, batch_size: int = 8,
                 cleanup: Cleanup | None = None, progress=None, timings: dict | None = None,
                 review: dict | None = None) -> Path:
    """Segment ``image`` (file or DICOM folder) and write the labelmap to ``output``.

    ``output``: ``.nii.gz``/``.nii``/``.nrrd``/``.mha`` (label values of the class map, plus a
    class-map JSON beside NIfTI/MHA) or ``.seg.nrrd`` (Slicer segmentation with segment names and
    colours), via :func:`TSKDLib.data.io.write_labelmap` (atomic; never overwrites unless asked).
    ``review``: as in :func:`segment_image`.

    Raises :class:`ModelPackageError`, :class:`InputError`, :class:`TSKDLib.errors.RunExistsError`."""
    from TSKDLib.data.io import write_labelmap

    pkg = _as_package(model)
    output = Path(output)
    if output.exists() and not overwrite:
        from TSKDLib.errors import RunExistsError

        raise RunExistsError("output file exists and would be overwritten.", output,
                             "Choose another output path or pass --overwrite.")
    tm = timings if timings is not None else {}
    labels = segment_image(pkg, image, batch_size, cleanup, progress, tm, review)
    t0 = time.perf_counter()
    path = write_labelmap(labels, output, pkg.class_map, overwrite=overwrite)
    tm["write"] = time.perf_counter() - t0
    return path
