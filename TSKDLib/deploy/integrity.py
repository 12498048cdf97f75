"""Input integrity: no silent wrong output from damaged scans.

- :func:`verify_file`: compressed payloads are read to the end before SimpleITK sees the file, so a
  truncated or bit-flipped ``.nii.gz``, gzip-encoded ``.nrrd``/``.nhdr``/``.seg.nrrd`` or
  compressed ``.mha`` is an error (gzip CRC-32 and length, zlib Adler-32) instead of a volume
  padded with zeros. Cost: one decompression pass. A bit flip in *uncompressed* raw data carries
  no checksum and cannot be detected; a cut raw file is caught by the readers' size checks.
- :func:`check_dicom_series`: a DICOM folder must hold one series of same-size, same-orientation
  slices at distinct, regularly spaced positions. A missing slice (ITK would average the spacing
  and put every slice on a distorted grid), a duplicated position, several series, mixed
  orientation or size, and varying spacing are errors naming the files and positions.
- :func:`call_itk`: what ITK prints on the C++ standard error while reading (warnings such as
  "Non uniform sampling or missing slices detected") is captured and turned into
  :class:`~TSKDLib.errors.TSKDWarning` warnings or TSKD errors, never left as C++ text only.
"""

from __future__ import annotations

import gzip
import os
import re
import sys
import tempfile
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TSKDLib.errors import CorruptFileError, DicomSeriesError, InputError, TSKDWarning

#: Relative deviation of a slice step from the series' nominal spacing that counts as a gap.
SPACING_TOLERANCE = 0.10
_CHUNK = 1 << 20
_REREAD = "Copy or export the file again from its source (nothing was written)."


# ------------------------------------------------------------------------------------------------
# Compressed payloads
# ------------------------------------------------------------------------------------------------
def verify_gzip(path: str | Path, offset: int = 0) -> None:
    """Decompress the gzip stream(s) of ``path`` from byte ``offset`` to the end, checking each
    member's CRC-32 and length; raises :class:`CorruptFileError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                while gz.read(_CHUNK):
                    pass
    except EOFError:
        raise CorruptFileError("truncated/corrupt gzip: the compressed data ends before its end marker "
                               "(the file was cut short, e.g. by an interrupted copy or download).",
                               path, _REREAD) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise CorruptFileError(f"truncated/corrupt gzip: the compressed data is damaged ({exc}).",
                               path, _REREAD) from None


def verify_zlib(path: str | Path, offset: int) -> None:
    """Decompress a zlib stream (MetaImage ``CompressedData``) to its end, checking Adler-32."""
    path = Path(path)
    d = zlib.decompressobj()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while not d.eof:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                d.decompress(chunk, _CHUNK)
                while d.unconsumed_tail and not d.eof:
                    d.decompress(d.unconsumed_tail, _CHUNK)
    except zlib.error as exc:
        raise CorruptFileError(f"truncated/corrupt compressed data ({exc}).", path, _REREAD) from None
    if not d.eof:
        raise CorruptFileError("truncated/corrupt compressed data: the stream ends before its end marker "
                               "(the file was cut short).", path, _REREAD)


def _nrrd_header(path: Path) -> tuple[dict, int] | None:
    """NRRD header fields (lower-case keys) and the byte offset of attached data; None if the file
    does not start like a NRRD header."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.startswith(b"NRRD"):
        return None
    m = re.search(rb"\r?\n\r?\n", head)
    end = m.end() if m else len(head)
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if line.startswith("#") or not sep or value.startswith("="):  # comments, key:=value pairs
            continue
        fields[key.strip().lower()] = value.strip()
    return fields, end


def _mha_header(path: Path) -> tuple[dict, int] | None:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    fields, pos = {}, 0
    for line in head.split(b"\n"):
        pos += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, pos
    return None


def verify_file(path: str | Path) -> None:
    """Check the compressed payload of an image file before it is read (see the module doc).

    ``.nii.gz`` (and any file starting with the gzip magic), gzip-encoded NRRD (attached or a
    detached ``data file``), and compressed MetaImage; other files are left to the reader."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        return
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":  # .nii.gz, .gz
        verify_gzip(path)
    elif magic == b"NRRD":
        parsed = _nrrd_header(path)
        if parsed is None:
            return
        fields, offset = parsed
        if fields.get("encoding", "raw").lower() not in ("gz", "gzip"):
            return
        data_file = fields.get("data file") or fields.get("datafile")
        if data_file is None:
            verify_gzip(path, offset)
        elif not data_file.upper().startswith("LIST") and " " not in data_file:
            target = (path.parent / data_file)
            if not target.is_file():
                raise InputError(f"the NRRD header names a data file {data_file!r} that does not exist.", path,
                                 "Keep the .nhdr and its data file together.")
            verify_gzip(target)
    elif name.endswith((".mha", ".mhd")):
        parsed = _mha_header(path)
        if parsed is None:
            return
        fields, offset = parsed
        if fields.get("CompressedData", "False").lower() != "true":
            return
        data_file = fields.get("ElementDataFile", "LOCAL")
        if data_file.upper() == "LOCAL":
            verify_zlib(path, offset)
        elif (path.parent / data_file).is_file():
            verify_zlib(path.parent / data_file, 0)


# ------------------------------------------------------------------------------------------------
# ITK messages on the C++ standard error
# ------------------------------------------------------------------------------------------------
_stderr_lock = threading.RLock()
_ITK_HEAD = re.compile(r"^(WARNING|ERROR):\s*In\s.*line\s+\d+\s*$")
_ITK_OBJ = re.compile(r"^\w[\w:<>, ]*\s\(0x[0-9a-fA-F]+\):\s*")


def parse_itk_output(text: str) -> list[str]:
    """ITK's ``WARNING: In file, line N`` / ``Class (0x...): message`` blocks as messages."""
    messages, block = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            block.append(line.strip())
            continue
        if block:
            lines = [ln for ln in block if not _ITK_HEAD.match(ln)]
            msg = " ".join(_ITK_OBJ.sub("", ln, count=1) for ln in lines).strip()
            msg = re.sub(r"\s+", " ", msg)
            if msg:
                messages.append(msg)
            block = []
    return messages


def call_itk(fn, *args):
    """Call ``fn(*args)`` while capturing the process's standard error (file descriptor 2, where
    ITK's C++ code prints); returns ``(result, messages)``. Exceptions propagate unchanged."""
    with _stderr_lock:
        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass
        try:
            saved = os.dup(2)
        except OSError:  # no standard error (embedded interpreter): nothing to capture
            return fn(*args), []
        messages: list[str] = []
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                result = fn(*args)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                messages = parse_itk_output(tmp.read().decode("utf-8", errors="replace"))
        return result, messages


def emit_itk_messages(messages: list[str], path) -> None:
    """ITK reader messages as TSKD errors (irregular slices) or :class:`TSKDWarning` warnings."""
    for msg in messages:
        if "non uniform sampling" in msg.lower() or "missing slices" in msg.lower():
            raise DicomSeriesError(f"ITK found irregular slice positions ({msg}).", path,
                                   "Export the complete series again (every slice) and retry.")
        warnings.warn(f"{path}: {msg}", TSKDWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# DICOM series
# ------------------------------------------------------------------------------------------------
@dataclass
class SliceInfo:
    file: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    size: tuple
    image_type: str = ""
    description: str = ""


def _slice_info(path: str) -> SliceInfo:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(path)
    r.LoadPrivateTagsOff()
    r.ReadImageInformation()

    def tag(key):
        return r.GetMetaData(key).strip() if r.HasMetaDataKey(key) else ""

    def floats(key, n):
        try:
            v = np.array([float(x) for x in tag(key).split("\\")])
            return v if v.size == n else None
        except ValueError:
            return None

    return SliceInfo(path, floats("0020|0032", 3), floats("0020|0037", 6), tuple(r.GetSize()),
                     tag("0008|0008").upper(), tag("0008|103e"))


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _short(files, n=3) -> str:
    names = [Path(f).name for f in files]
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_dicom_series(folder: str | Path) -> list[str]:
    """The file names of the one image series in ``folder``, sorted along the slice normal.

    Raises :class:`DicomSeriesError` (several series, missing or duplicated slices, mixed
    orientation or size, varying spacing) and :class:`InputError` (no series); warns
    (:class:`TSKDWarning`) about ignored files (non-DICOM files, localizers, unreadable DICOM
    files when the series is complete without them)."""
    import SimpleITK as sitk

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series_ids, _ = call_itk(reader.GetGDCMSeriesIDs, str(folder))
    if not series_ids:
        raise InputError("folder holds no DICOM series and no image file TSKD can read.", folder,
                         "Point at a DICOM series folder or at an image file (.nii.gz, .nrrd, .mha, .png).")
    series = {}
    for sid in series_ids:
        files, _ = call_itk(reader.GetGDCMSeriesFileNames, str(folder), sid)
        series[sid] = list(files)
    listed = {os.path.abspath(f) for fl in series.values() for f in fl}
    others = [p for p in sorted(folder.iterdir())
              if p.is_file() and not p.name.startswith(".") and os.path.abspath(p) not in listed]
    unreadable = [p for p in others if _is_dicom_file(p) and p.name.upper() != "DICOMDIR"]
    ignored = [p for p in others if p not in unreadable]

    infos = {sid: [_slice_info(f) for f in files] for sid, files in series.items()}
    # Localizers (scouts) are not part of the scan: drop them when another series remains.
    kept = {sid: inf for sid, inf in infos.items() if "LOCALIZER" not in (inf[0].image_type if inf else "")}
    if kept and len(kept) < len(infos):
        dropped = [f for sid in infos if sid not in kept for f in series[sid]]
        warnings.warn(f"{folder}: ignoring {len(dropped)} localizer (scout) image(s): {_short(dropped)}.",
                      TSKDWarning, stacklevel=3)
    kept = kept or infos
    if len(kept) > 1:
        desc = "; ".join(f"{sid or '(no series UID)'} '{inf[0].description}' ({len(inf)} files, e.g. "
                         f"{min(Path(s.file).name for s in inf)})" for sid, inf in kept.items())
        raise DicomSeriesError(f"folder holds {len(kept)} DICOM series: {desc}.", folder,
                               "Put each series in its own folder (or remove the ones you do not want) "
                               "and point TSKD at the folder of the one series.")
    (sid, slices), = kept.items()
    if ignored:
        warnings.warn(f"{folder}: ignoring {len(ignored)} file(s) that are not DICOM images: {_short(ignored)}.",
                      TSKDWarning, stacklevel=3)
    broken = (f" The folder also holds DICOM file(s) that could not be read (truncated or corrupt?): "
              f"{_short(unreadable)}." if unreadable else "")
    if len(slices) > 1:
        _check_slices(folder, slices, broken)
    if unreadable:
        warnings.warn(f"{folder}: ignoring DICOM file(s) that could not be read (truncated or corrupt?): "
                      f"{_short(unreadable)}; the series is complete without them.", TSKDWarning, stacklevel=3)
    return [s.file for s in _sorted(slices)]


def _normal(slices: list[SliceInfo]) -> np.ndarray:
    o = slices[0].orientation
    n = np.cross(o[:3], o[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _sorted(slices: list[SliceInfo]) -> list[SliceInfo]:
    if len(slices) < 2 or any(s.position is None or s.orientation is None for s in slices):
        return slices
    n = _normal(slices)
    return sorted(slices, key=lambda s: float(s.position @ n))


def _check_slices(folder: Path, slices: list[SliceInfo], broken: str) -> None:
    fix = "Export the complete series again (every slice, one series per folder) and retry."
    sizes = {}
    for s in slices:
        sizes.setdefault(s.size[:2], []).append(s.file)
    if len(sizes) > 1:
        desc = "; ".join(f"{'x'.join(map(str, k))}: {_short(v, 2)}" for k, v in sizes.items())
        raise DicomSeriesError(f"series mixes slice sizes ({desc}).", folder, fix)
    missing = [s.file for s in slices if s.position is None or s.orientation is None]
    if missing:
        raise DicomSeriesError(f"slices without a position or orientation (ImagePositionPatient/"
                               f"ImageOrientationPatient): {_short(missing)}.", folder, fix)
    ref = slices[0].orientation
    odd = [s.file for s in slices if np.abs(s.orientation - ref).max() > 1e-3]
    if odd:
        raise DicomSeriesError(f"series mixes slice orientations ({_short(odd)} differ from "
                               f"{Path(slices[0].file).name}).", folder, fix)
    ordered = _sorted(slices)
    n = _normal(slices)
    z = np.array([float(s.position @ n) for s in ordered])
    # In-plane offsets: slices of one stack share their position along the row and column axes
    # up to a gantry tilt; a shift here is a mixed stack, not a gap.
    steps = np.diff(z)
    if steps.size == 0:
        return
    dup = [(ordered[i].file, ordered[i + 1].file, z[i]) for i in np.flatnonzero(steps < 1e-3)]
    if dup:
        desc = "; ".join(f"{Path(a).name} and {Path(b).name} at {p:.2f} mm" for a, b, p in dup[:3])
        raise DicomSeriesError(f"series has {len(dup)} duplicated slice position(s): {desc}.", folder,
                               "Remove the duplicated files (one file per slice position) and retry.")
    nominal = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - nominal) > SPACING_TOLERANCE * nominal)
    if bad.size == 0:
        return
    gaps = []
    for i in bad[:3]:
        ratio = steps[i] / nominal
        k = int(round(ratio)) - 1
        what = (f"about {k} slice(s) missing" if k >= 1 and abs(ratio - round(ratio)) < SPACING_TOLERANCE
                else f"step {steps[i]:.3g} mm")
        gaps.append(f"{what} between {Path(ordered[i].file).name} (at {z[i]:.2f} mm) and "
                    f"{Path(ordered[i + 1].file).name} (at {z[i + 1]:.2f} mm)")
    if all(steps[i] > nominal for i in bad) and all(
            abs(steps[i] / nominal - round(steps[i] / nominal)) < SPACING_TOLERANCE for i in bad):
        raise DicomSeriesError(f"series has a gap in its slice positions (spacing {nominal:.3g} mm): "
                               f"{'; '.join(gaps)}.{broken}", folder,
                               "Export the complete series again (every slice) and retry; TSKD does not "
                               "read a series with missing slices, its grid would be distorted.")
    raise DicomSeriesError(f"slice spacing varies from {steps.min():.3g} to {steps.max():.3g} mm "
                           f"(median {nominal:.3g} mm): {'; '.join(gaps)}.{broken}", folder,
                           "Resample the series onto a regular grid (e.g. in Slicer, Resample Scalar "
                           "Volume, saved as .nrrd) and retry.")
