"""Reading and writing images and labels (SimpleITK, slicerio).

Supported inputs
----------------
- Scalar volumes: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
  ``.mhd``), and a folder holding one DICOM series.
- 2D images: PNG, JPEG, BMP, TIFF (ultrasound, endoscopy). They become 3D volumes with one slice
  (spacing 1 mm unless given), so every stage treats 2D and 3D alike. RGB 2D images are converted
  to luminance (ITU-R BT.601 weights); RGB *volumes* are rejected.
- Labels: a label volume (integer values, with a class map JSON ``{"value": "name"}``) or a Slicer
  segmentation ``.seg.nrrd`` (segment names, label values and colours read with slicerio).

All images are returned as SimpleITK images (physical space in LPS mm).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from TSKDLib.data.classmap import ClassMap
from TSKDLib.errors import InputError, LabelError, RunExistsError, TSKDError, WriteError

IMAGE_2D_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VOLUME_SUFFIXES = {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd"}


def suffix_of(path: str | Path) -> str:
    """Lower-case file suffix, keeping double suffixes ``.nii.gz`` and ``.seg.nrrd``."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".seg.nrrd"):
        if name.endswith(double):
            return double
    return Path(name).suffix


@dataclass
class ImageInfo:
    """What was learned while reading an image: its source and DICOM modality (if any)."""

    path: str
    modality: str | None = None  # DICOM (0008,0060), e.g. "CT", "MR", "US"
    is_2d: bool = False


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, ImageInfo]:
    from TSKDLib.deploy.integrity import call_itk, check_dicom_series, emit_itk_messages

    # One series of same-size, same-orientation slices at regular, distinct positions, else a
    # DicomSeriesError naming the files (TSKDLib/deploy/integrity.py): ITK would average the spacing
    # over a missing slice and put the whole scan on a distorted grid.
    files = check_dicom_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image, messages = call_itk(reader.Execute)
    except RuntimeError as exc:
        raise InputError(f"DICOM series could not be read ({_first_line(exc)}).", folder,
                         "Check that the files form one complete series.") from None
    emit_itk_messages(messages, folder)
    modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else None
    return image, ImageInfo(str(folder), modality)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful text last ("... ImageIO ... : Could not create IO object ...").
    return lines[-1] if lines else type(exc).__name__


def _read_file(path: Path) -> sitk.Image:
    from TSKDLib.deploy.integrity import call_itk, emit_itk_messages, verify_file

    if not path.exists():
        raise InputError("file not found.", path, "Check the path.")
    verify_file(path)  # compressed data read to the end (gzip CRC): a cut file is an error, not zeros
    try:
        image, messages = call_itk(sitk.ReadImage, str(path))
    except RuntimeError as exc:
        raise InputError(f"file could not be read as an image ({_first_line(exc)}).", path,
                         "Use NIfTI, NRRD, MHA, a DICOM folder, or PNG/JPEG for 2D images.") from None
    emit_itk_messages(messages, path)
    return image


def _to_luminance(image: sitk.Image) -> sitk.Image:
    """RGB(A) 2D image to grey (BT.601 luma), keeping geometry."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    grey = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    out = sitk.GetImageFromArray(grey)
    out.CopyInformation(image)
    return out


def as_volume(image: sitk.Image, spacing_2d: tuple[float, float] | None = None) -> sitk.Image:
    """A 2D image as a 3D volume of one slice (z spacing 1 mm); 3D images are returned as is."""
    if image.GetDimension() == 3:
        return image
    if spacing_2d is not None:
        image = sitk.Image(image)
        image.SetSpacing([float(s) for s in spacing_2d])
    return sitk.JoinSeries([image], 0.0, 1.0)


def _check_intensities(image: sitk.Image, path) -> None:
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size == 0:
        raise InputError("image is empty (no voxels).", path, "Check the file; it may be truncated.")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InputError(f"image has {int(bad.sum())} NaN or infinite intensities.", path,
                             "Fix the image (for example replace NaN by the background value) and retry.")
    if arr.min() == arr.max():
        raise InputError(f"image is empty (every voxel is {arr.min()}).", path,
                         "Check that this is the right image.")


def read_image(path: str | Path, spacing_2d: tuple[float, float] | None = None,
               ) -> tuple[sitk.Image, ImageInfo]:
    """Read a scalar image as a 3D float32 SimpleITK image.

    Parameters
    ----------
    path:
        Volume file, DICOM series folder, or 2D image file.
    spacing_2d:
        Pixel spacing ``(x, y)`` in mm for 2D images that carry none (PNG/JPEG).

    Returns
    -------
    (image, info)
        ``image`` is 3D, float32, intensities as stored (HU for CT); ``info`` holds the modality.

    Raises
    ------
    InputError
        Missing/unreadable file, 4D volume, RGB/vector volume, empty image, NaN/inf intensities.
    """
    path = Path(path)
    if path.is_dir():
        image, info = _read_dicom_series(path)
    else:
        image = _read_file(path)
        info = ImageInfo(str(path))
        try:
            mod = image.GetMetaData("0008|0060").strip() if image.HasMetaDataKey("0008|0060") else None
        except RuntimeError:
            mod = None
        info.modality = mod or None
    ncomp = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == 2:
        info.is_2d = True
        if ncomp in (3, 4):
            image = _to_luminance(image)
        elif ncomp != 1:
            raise InputError(f"2D image has {ncomp} components per pixel.", path, "Use a grey or RGB image.")
        image = as_volume(image, spacing_2d)
    elif image.GetDimension() == 3:
        if ncomp != 1:
            raise InputError(f"volume has {ncomp} components per voxel (RGB or vector), but a scalar "
                             "volume is needed.", path,
                             "Convert it to a scalar (grey) volume, e.g. in Slicer with Vector to Scalar Volume.")
        if image.GetSize()[2] == 1:
            info.is_2d = True
    else:
        raise InputError(f"image is {image.GetDimension()}D; TSKD needs a 2D image or a 3D volume.",
                         path, "Extract one 3D volume (one time point or channel) and retry.")
    image = sitk.Cast(image, sitk.sitkFloat32)
    _check_intensities(image, path)
    return image, info


def read_label_file(path: str | Path, class_map: ClassMap | None = None,
                    binary_threshold: int | None = None) -> tuple[sitk.Image, ClassMap]:
    """Read labels as a 3D integer volume of *file label values* and the class map.

    Parameters
    ----------
    path:
        ``.seg.nrrd`` (Slicer segmentation), a label volume, or a 2D mask image.
    class_map:
        Required for label volumes unless the values are self-explanatory; ignored names for
        ``.seg.nrrd`` come from the file. If None for a label volume, every non-zero value
        becomes a class named ``label_<value>``.
    binary_threshold:
        For 2D masks stored as grey/RGB images (0/255): values >= threshold (channel 0) become
        the class map's single label value... (the value 255 is kept as the file value).

    Raises
    ------
    InputError, LabelError
    """
    path = Path(path)
    if suffix_of(path) == ".seg.nrrd":
        return read_seg_nrrd(path, class_map)
    image = _read_file(path)
    if image.GetDimension() not in (2, 3):
        raise InputError(f"label image is {image.GetDimension()}D.", path,
                         "Use a 3D label volume or a 2D mask.")
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        if image.GetDimension() == 3:
            raise InputError("label volume has several components per voxel (RGB?).", path,
                             "Save the labels as a scalar label volume.")
        image = sitk.VectorIndexSelectionCast(image, 0)
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
            raise LabelError("label volume holds non-integer values.", path,
                             "Labels must be integer label values; save them as a labelmap.")
    if binary_threshold is not None:
        value = class_map.values[0] if class_map is not None and class_map.num_classes == 1 else 1
        arr = np.where(arr >= binary_threshold, value, 0)
    if arr.min() < 0:
        raise LabelError("label volume holds negative values.", path, "Label values must be >= 0.")
    arr = arr.astype(np.uint16 if arr.max() > 255 else np.uint8)
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(image)
    if class_map is None:
        values = [int(v) for v in np.unique(arr) if v != 0]
        if not values:
            raise LabelError("label volume is all background and no class map was given.", path,
                             "Give a class map JSON naming the classes.")
        class_map = ClassMap(values, [f"label_{v}" for v in values])
    return as_volume(labels), class_map


def read_seg_nrrd(path: str | Path, class_map: ClassMap | None = None) -> tuple[sitk.Image, ClassMap]:
    """Read a Slicer ``.seg.nrrd``: labels (3D, file label values) and a class map from its segments.

    Overlapping segments (several layers) are collapsed in segment order (later segments win).
    If ``class_map`` is given, segments are matched to it by name and get its label values."""
    import slicerio

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found.", path, "Check the path of the .seg.nrrd file.")
    from TSKDLib.deploy.integrity import verify_file
    verify_file(path)
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises IOError/KeyError/ValueError on bad files
        raise InputError(f"not a readable Slicer segmentation ({exc}).", path,
                         "Save the segmentation from Slicer as .seg.nrrd.") from None
    segments = seg.get("segments", [])
    if not segments:
        raise LabelError("segmentation has no segments.", path, "Draw at least one segment in Slicer.")
    names = [s.get("name", s["id"]) for s in segments]
    if class_map is None:
        colors = [tuple(int(round(255 * c)) for c in s.get("color", (1, 1, 1))) for s in segments]
        class_map = ClassMap(list(range(1, len(names) + 1)), names, colors)
    else:
        unknown = [n for n in names if n not in class_map.names]
        if unknown:
            raise LabelError(f"segments {unknown} are not in the class map {class_map.names}.", path,
                             "Rename the segments or add them to the class map.")
    pairs = [(n, class_map.values[class_map.names.index(n)]) for n in names]
    extracted = slicerio.extract_segments(seg, pairs)
    voxels = np.asarray(extracted["voxels"])  # indexed (i, j, k)
    ijk_to_lps = np.asarray(extracted["ijkToLPS"], dtype=float)
    arr = np.ascontiguousarray(voxels.transpose(2, 1, 0))  # (k, j, i) for SimpleITK
    arr = arr.astype(np.uint16 if class_map.values and max(class_map.values) > 255 else np.uint8)
    labels = sitk.GetImageFromArray(arr)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    labels.SetSpacing(spacing.tolist())
    labels.SetDirection((columns / spacing).flatten().tolist())
    labels.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return labels, class_map


# --------------------------------------------------------------------------------------------
# 2D image/mask folders
# --------------------------------------------------------------------------------------------
@dataclass
class ImageMaskPair:
    """One 2D image file and its mask file (mask may be None for unlabelled images)."""

    image: Path
    mask: Path | None
    subject: str


def find_2d_pairs(images_dir: str | Path, masks_dir: str | Path | None = None,
                  mask_suffix: str = "_Annotation", subject_pattern: str = r"^(\d+)") -> list[ImageMaskPair]:
    """Pair 2D images with masks by file name: ``NAME.png`` <-> ``NAME{mask_suffix}.png``.

    The subject id is the first group of ``subject_pattern`` matched on the image stem (HC18:
    ``010_2HC`` -> ``010``), else the whole stem; benchmarks split by subject, never by file.

    Raises :class:`InputError` if the folder holds no image."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError("image folder not found.", images_dir, "Check the path.")
    masks_dir = Path(masks_dir) if masks_dir is not None else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise InputError("mask folder not found.", masks_dir, "Check the path.")
    mask_files = {}
    if masks_dir is not None:
        for f in masks_dir.iterdir():
            if f.suffix.lower() in IMAGE_2D_SUFFIXES:
                mask_files[f.stem] = f
    pairs = []
    for f in sorted(images_dir.iterdir()):
        if f.suffix.lower() not in IMAGE_2D_SUFFIXES or f.stem.endswith(mask_suffix):
            continue
        mask = mask_files.get(f.stem + mask_suffix) or (mask_files.get(f.stem) if masks_dir != images_dir else None)
        m = re.match(subject_pattern, f.stem)
        pairs.append(ImageMaskPair(f, mask, m.group(1) if m else f.stem))
    if not pairs:
        raise InputError("folder holds no 2D image (.png, .jpg, .bmp, .tif).", images_dir,
                         "Point at the folder of images.")
    return pairs


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
#: Errors of a write the user can fix (free space, choose a writable folder), as shown to them.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", 122): "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system", errno.EFBIG: "file too large for the file system"}
_FULL_BYTES = 1 << 20  # below this many free bytes, a failed write is taken as a full disk


def _disk_nearly_full(path: Path) -> bool:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < _FULL_BYTES
    except OSError:
        return False


def write_error(exc: BaseException, path: str | Path) -> WriteError | None:
    """The :class:`WriteError` (one line: path, reason, fix) for a failed write, or None when
    ``exc`` is not a full disk, a quota, a permission or a read-only file system.

    ``OSError`` is mapped by errno; other errors (SimpleITK and PyTorch raise ``RuntimeError`` on a
    full disk) count as "no space left on device" when the disk has under 1 MiB free."""
    reason = None
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        reason = WRITE_ERRNOS[exc.errno]
    elif isinstance(exc, (OSError, RuntimeError)) and _disk_nearly_full(Path(path).parent):
        reason = WRITE_ERRNOS[errno.ENOSPC]
    if reason is None:
        return None
    if reason in ("no space left on device", "disk quota exceeded", "file too large for the file system"):
        fix = "Free some space on that disk (or write to another one) and run the command again."
    else:
        fix = "Choose a folder you can write to (or fix its permissions) and run the command again."
    return WriteError(f"could not write: {reason}; the previous file, if any, is unchanged.", path, fix)


@contextmanager
def guard_write(path: str | Path):
    """Turn a failed write of ``path`` (full disk, permission, read-only) into :class:`WriteError`."""
    try:
        yield
    except TSKDError:
        raise
    except Exception as exc:
        err = write_error(exc, path)
        if err is None:
            raise
        raise err from exc


def atomic_write(path: Path, write_fn, overwrite: bool = False) -> Path:
    """Write a file atomically: ``write_fn(tmp_path)`` then rename onto ``path``. The one way
    TSKD writes a file (folders: :func:`atomic_dir`); the temporary file is beside ``path``
    (same file system) and keeps its suffix (``.nii.gz``, ``.png``) for writers that read it.

    A failed write (full disk, permission denied, read-only file system) raises
    :class:`WriteError` in one line and leaves ``path`` as it was (the temporary file is removed).
    Raises :class:`RunExistsError` if ``path`` exists and ``overwrite`` is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise RunExistsError("output file exists and would be overwritten.", path,
                             "Choose another output path or pass --overwrite.")
    tmp = None
    try:
        with guard_write(path):  # the check runs before the temporary file is removed
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix_of(path), dir=path.parent)
            os.close(fd)
            write_fn(Path(tmp))
            os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def replace_dir(tmp: str | Path, directory: str | Path) -> Path:
    """Move a fully written folder ``tmp`` onto ``directory`` atomically (same file system).

    An existing ``directory`` is swapped out first and removed only after the new one is in
    place, so a reader sees either the old or the new folder, never a half-written one."""
    tmp, directory = Path(tmp), Path(directory)
    with guard_write(directory):
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    return directory


@contextmanager
def atomic_dir(directory: str | Path, create: bool = True):
    """Build a folder beside ``directory`` and swap it in atomically: the one way TSKD writes
    a folder (model package, teacher files, diffusion model, synthetic set).

    ``with atomic_dir(out) as tmp:`` yields ``<out>.tmp-<pid>`` (created when ``create``, else
    left for the caller to create, e.g. by ``shutil.copytree``); when the block ends normally it
    replaces ``directory`` (:func:`replace_dir`), so a reader sees the old or the new folder,
    never a half-written one. On any error the temporary folder is removed and ``directory`` is
    unchanged; a full disk, a permission or a read-only file system raises :class:`WriteError`.
    """
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with guard_write(directory):  # checked before the partial folder is removed
            directory.parent.mkdir(parents=True, exist_ok=True)
            if create:
                tmp.mkdir()
            yield tmp
            replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts with the same keys, the first row's order giving the columns) as a
    CSV table with a header line, atomically (:func:`atomic_write`, replacing any previous file)."""
    import csv

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    return atomic_write(Path(path), write, overwrite=True)


def write_labelmap(labels: sitk.Image, path: str | Path, class_map: ClassMap,
                   overwrite: bool = False) -> Path:
    """Write a labelmap of *class indices* ``0..K`` in file label values.

    ``.nii``/``.nii.gz``/``.nrrd``/``.mha`` get a scalar labelmap of the class map's label values
    (a ``<name>.json`` class map is written beside NIfTI/MHA files); ``.seg.nrrd`` gets a Slicer
    segmentation with one segment per class (name, colour, label value) via slicerio. The
    geometry of ``labels`` (origin, spacing, direction) is written unchanged. Atomic; never
    overwrites unless ``overwrite``.
    """
    path = Path(path)
    suffix = suffix_of(path)
    indices = sitk.GetArrayFromImage(labels)
    if suffix == ".seg.nrrd":
        import slicerio

        spacing = np.array(labels.GetSpacing())
        direction = np.array(labels.GetDirection()).reshape(3, 3)
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction * spacing
        ijk_to_lps[:3, 3] = labels.GetOrigin()
        voxels = np.ascontiguousarray(indices.transpose(2, 1, 0)).astype(np.uint8)  # (i, j, k)
        seg = slicerio.create_segmentation(voxels.shape, ijk_to_lps)
        seg["voxels"] = voxels
        for i, (name, color) in enumerate(zip(class_map.names, class_map.colors)):
            mask = voxels == i + 1
            extent = [0, -1, 0, -1, 0, -1]
            if mask.any():
                extent = []
                for axis in range(3):  # bounding box from the projections (fast on big volumes)
                    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                    extent += [int(hit[0]), int(hit[-1])]
            seg["segments"].append({
                "id": f"Segment_{i + 1}", "name": name, "labelValue": i + 1, "layer": 0,
                "color": [c / 255.0 for c in color], "extent": extent})
        # gzip level 1: a 512x512x100 labelmap compresses ~5x faster than level 9 for a few % more bytes
        return atomic_write(path, lambda tmp: slicerio.write_segmentation(str(tmp), seg, compression_level=1),
                            overwrite)
    if suffix not in {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"}:
        raise InputError(f"unsupported output format {suffix!r}.", path,
                         "Use .nii.gz, .nrrd, .mha or .seg.nrrd.")
    values = sitk.GetImageFromArray(class_map.to_values(indices))
    values.CopyInformation(labels)
    out = atomic_write(path, lambda tmp: sitk.WriteImage(values, str(tmp), True, 1), overwrite)
    if suffix in {".nii", ".nii.gz", ".mha", ".mhd"}:
        import json
        cmap = path.with_name(path.name[: -len(suffix)] + ".json")
        text = json.dumps({str(v): n for v, n in zip(class_map.values, class_map.names)}, indent=1)
        if not cmap.exists() or overwrite:
            atomic_write(cmap, lambda tmp: tmp.write_text(text), overwrite=True)
    return out
