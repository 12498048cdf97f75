"""Fault-injection matrix on the bundled data (issue 12): damaged scans, irregular DICOM folders,
labels off the image, full disks and read-only destinations, and two writers on one run.

Every case asserts the exact outcome: the error class and the words of its one-line message, the
exit status of ``tskd`` (2), and that no output was written or the previous file is unchanged.
No training here: the model package is an untrained 64 px student (exported once per module),
and the lock tests fail before any heavy work.
"""

from __future__ import annotations

import errno
import json
import locale
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TSKDLib.cli import main as cli
from TSKDLib.data.classmap import ClassMap
from TSKDLib.errors import (CorruptFileError, DicomSeriesError, GeometryError, InputError, RunLockedError,
                            TSKDWarning, WriteError)
from TSKDLib.data.io import atomic_write, read_image, read_label_file, write_labelmap

ROOT = Path(__file__).resolve().parents[3]
TOTALSEG = ROOT / "Testing" / "Data" / "totalseg"
CT = TOTALSEG / "example_ct_sm.nii.gz"
CT_SEG = TOTALSEG / "example_seg.nii.gz"
CT_MAP = TOTALSEG / "label_map_total_ct.json"
DICOM = TOTALSEG / "ct_dicom"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _cut(src: Path, dst: Path, nbytes: int) -> Path:
    dst.write_bytes(src.read_bytes()[:nbytes])
    return dst


def _flip(src: Path, dst: Path, offset: int | None = None, bit: int = 0x10) -> Path:
    data = bytearray(src.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= bit
    dst.write_bytes(bytes(data))
    return dst


def _tskd(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tskd: error: "), err
    return lines[0]


def _dicom_files() -> list[Path]:
    return sorted(p for p in DICOM.iterdir() if p.is_file())


def _dicom_copy(dst: Path, skip: tuple[int, ...] = ()) -> Path:
    dst.mkdir()
    for i, f in enumerate(_dicom_files()):
        if i not in skip:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The bundled CT as gzip NRRD and raw NRRD, and its liver+spleen labels as .seg.nrrd."""
    d = tmp_path_factory.mktemp("formats")
    image = sitk.ReadImage(str(CT))
    sitk.WriteImage(image, str(d / "ct_gz.nrrd"), True)
    sitk.WriteImage(image, str(d / "ct_raw.nrrd"), False)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(CT_SEG)))
    idx = np.select([lab == 1, lab == 5], [1, 2], 0).astype(np.uint8)
    labels = sitk.GetImageFromArray(idx)
    labels.CopyInformation(image)
    write_labelmap(labels, d / "labels.seg.nrrd", ClassMap([1, 5], ["spleen", "liver"]))
    return {"gz": d / "ct_gz.nrrd", "raw": d / "ct_raw.nrrd", "seg": d / "labels.seg.nrrd",
            "array": sitk.GetArrayFromImage(image)}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """An untrained 64 px student exported as a model package (segmenting only needs a package)."""
    import torch

    from TSKDLib.deploy.export import export_model_package
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.distillation.student import build_student

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pkg") / "model"
    model = build_student("unet-s", num_classes=2, input_size=64)
    export_model_package(model, out, ClassMap([1, 5], ["spleen", "liver"]), Normalization.preset("ct").to_dict(),
                         input_size=64, torchscript=False)
    return out


# ------------------------------------------------------------------------------------------------
# 1. damaged files: truncated and bit-flipped .nii.gz, .nrrd, .seg.nrrd
# ------------------------------------------------------------------------------------------------
def test_truncated_nii_gz_is_an_error_naming_the_file(tmp_path):
    # Before: SimpleITK read the first 20 kB as a scan of 96 % zeros, and segment wrote a result.
    bad = _cut(CT, tmp_path / "cut.nii.gz", 20_000)
    with pytest.raises(CorruptFileError) as e:
        read_image(bad)
    assert str(e.value).startswith(f"{bad}: truncated/corrupt gzip: the compressed data ends before its end marker")
    assert isinstance(e.value, InputError)


def test_bitflipped_nii_gz_fails_the_gzip_crc(tmp_path):
    bad = _flip(CT, tmp_path / "flip.nii.gz")
    with pytest.raises(CorruptFileError, match=r"truncated/corrupt gzip: the compressed data is damaged "
                                               r"\(CRC check failed 0x[0-9a-f]+ != 0x[0-9a-f]+\)"):
        read_image(bad)


def test_segment_truncated_scan_exits_2_and_writes_nothing(tmp_path, package, capsys):
    bad = _cut(CT, tmp_path / "cut.nii.gz", 20_000)
    out = tmp_path / "pred.seg.nrrd"
    code, _, err = _tskd(["segment", package, bad, "--out", out, "--device", "cpu", "--quiet"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert str(bad) in line and "truncated/corrupt gzip" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.nii.gz"]  # nothing written


def test_gzip_nrrd_truncated_and_bitflipped(tmp_path, formats):
    gz = formats["gz"]
    with pytest.raises(CorruptFileError, match="truncated/corrupt gzip: the compressed data ends before"):
        read_image(_cut(gz, tmp_path / "cut.nrrd", gz.stat().st_size // 3))
    with pytest.raises(CorruptFileError, match=r"truncated/corrupt gzip: .*CRC check failed"):
        read_image(_flip(gz, tmp_path / "flip.nrrd"))


def test_raw_nrrd_truncated_header_flip_and_the_undetectable_payload_flip(tmp_path, formats):
    raw = formats["raw"]
    # Cut: the NRRD reader's own size check (no gzip involved).
    with pytest.raises(InputError, match=r"cut\.nrrd: file could not be read as an image \(\[nrrd\] "
                                         r"_nrrdEncodingRaw_read: fread got only"):
        read_image(_cut(raw, tmp_path / "cut.nrrd", raw.stat().st_size // 3))
    # A flip in the header's magic ("NRRD" -> "ORRD"): not an image any more.
    with pytest.raises(InputError, match=r"hdr\.nrrd: file could not be read as an image"):
        read_image(_flip(raw, tmp_path / "hdr.nrrd", offset=0, bit=0x01))
    # A flip in an uncompressed raw payload carries no checksum and CANNOT be detected: the file
    # reads, with exactly one voxel changed. (Use .nii.gz or gzip NRRD for end-to-end integrity.)
    flipped = _flip(raw, tmp_path / "payload.nrrd", offset=raw.stat().st_size - 1001)
    image, _ = read_image(flipped)
    diff = sitk.GetArrayFromImage(image) != formats["array"].astype(np.float32)
    assert int(diff.sum()) == 1


def test_seg_nrrd_truncated_bitflipped_and_header(tmp_path, formats):
    seg = formats["seg"]
    labels, cmap = read_label_file(seg)  # the intact file reads
    assert cmap.names == ["spleen", "liver"] and sitk.GetArrayFromImage(labels).max() == 2
    with pytest.raises(CorruptFileError, match=r"cut\.seg\.nrrd: truncated/corrupt gzip: the compressed data ends"):
        read_label_file(_cut(seg, tmp_path / "cut.seg.nrrd", seg.stat().st_size // 2))
    with pytest.raises(CorruptFileError, match=r"flip\.seg\.nrrd: truncated/corrupt gzip: .*CRC check failed"):
        read_label_file(_flip(seg, tmp_path / "flip.seg.nrrd"))
    with pytest.raises(InputError, match=r"hdr\.seg\.nrrd: not a readable Slicer segmentation"):
        read_label_file(_flip(seg, tmp_path / "hdr.seg.nrrd", offset=0, bit=0x01))


def test_inspect_truncated_labels_exits_2(tmp_path, capsys):
    bad = _cut(CT_SEG, tmp_path / "seg.nii.gz", 10_000)
    code, out, err = _tskd(["inspect", CT, "--labels", bad, "--class-map", CT_MAP], capsys)
    assert code == 2 and out == ""
    assert f"{bad}: truncated/corrupt gzip" in _one_error_line(err)


# ------------------------------------------------------------------------------------------------
# 2. DICOM folders: missing slice, duplicate slice, two series, a non-image file
# ------------------------------------------------------------------------------------------------
def test_dicom_missing_slice_is_refused_naming_the_gap(tmp_path, capsys):
    # Before: ITK's C++ warning only, spacing averaged (2.11 mm instead of 2 mm), output on that grid.
    files = _dicom_files()
    folder = _dicom_copy(tmp_path / "series", skip=(8,))
    with pytest.raises(DicomSeriesError) as e:
        read_image(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder}: series has a gap in its slice positions (spacing 2 mm): "
                          "about 1 slice(s) missing between ")
    assert files[7].name in msg and files[9].name in msg  # the neighbours of the missing file
    assert "-784.50 mm" in msg and "-780.50 mm" in msg    # positions along the slice normal
    code, out, err = _tskd(["inspect", folder], capsys)
    assert code == 2 and out == "" and "gap in its slice positions" in _one_error_line(err)


def test_itk_warning_becomes_a_tskd_error_not_cpp_text(tmp_path, capfd):
    """Reading the gapped series with ITK directly prints a C++ warning; captured, it is an error."""
    from TSKDLib.deploy.integrity import call_itk, emit_itk_messages

    folder = _dicom_copy(tmp_path / "series", skip=(8,))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image, messages = call_itk(reader.Execute)
    assert image.GetSize()[2] == 19
    assert any("Non uniform sampling or missing slices detected" in m for m in messages)
    assert capfd.readouterr().err == ""  # nothing left on the C++ standard error
    with pytest.raises(DicomSeriesError, match="ITK found irregular slice positions"):
        emit_itk_messages(messages, folder)


def test_dicom_duplicate_slice(tmp_path):
    files = _dicom_files()
    folder = _dicom_copy(tmp_path / "series")
    shutil.copy(files[5], folder / "zz_copy")
    with pytest.raises(DicomSeriesError, match=rf"series has 1 duplicated slice position\(s\): "
                                               rf"{files[5].name} and zz_copy at -776\.50 mm\. Fix: Remove"):
        read_image(folder)


def test_dicom_two_series_are_listed(tmp_path, request):
    folder = _dicom_copy(tmp_path / "series")
    # A second series (a 5-slice reformat with its own series UID) in the same folder.
    full = sitk.ReadImage([str(f) for f in _dicom_files()])
    small = sitk.Cast(full[::4, ::4, :5], sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the C locale (ASCII) process-wide
    request.addfinalizer(lambda: locale.setlocale(locale.LC_ALL, saved_locale))
    for k in range(small.GetDepth()):
        s = small[:, :, k]
        for tag, value in {"0020|000e": "1.2.826.0.1.3680043.2.1125.999.2", "0020|000d": "1.2.826.0.1.3680043.2.1125.999",
                           "0008|0060": "CT", "0008|103e": "reformat", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0013": str(k + 1)}.items():
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(map(str, small.TransformIndexToPhysicalPoint((0, 0, k)))))
        writer.SetFileName(str(folder / f"second_{k}.dcm"))
        writer.Execute(s)
    with pytest.raises(DicomSeriesError) as e:
        read_image(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder}: folder holds 2 DICOM series: (no series UID) 'CT Body 3.0' (20 files")
    assert "1.2.826.0.1.3680043.2.1125.999.2 'reformat' (5 files, e.g. second_0.dcm)" in msg
    assert "Fix: Put each series in its own folder" in msg


def test_dicom_non_image_file_is_ignored_with_a_warning(tmp_path):
    folder = _dicom_copy(tmp_path / "series")
    (folder / "notes.txt").write_text("scan notes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, info = read_image(folder)
        clean, _ = read_image(DICOM)
    texts = [str(w.message) for w in caught if issubclass(w.category, TSKDWarning)]
    assert texts == [f"{folder}: ignoring 1 file(s) that are not DICOM images: notes.txt."]
    assert info.modality == "CT" and image.GetSize() == clean.GetSize() == (512, 512, 20)
    assert image.GetSpacing() == clean.GetSpacing()
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(clean))


# ------------------------------------------------------------------------------------------------
# 3. labels on another grid that does not overlap the image
# ------------------------------------------------------------------------------------------------
def test_labels_not_overlapping_the_image(tmp_path, capsys):
    labels = sitk.ReadImage(str(CT_SEG))
    labels.SetOrigin([o + 2000.0 for o in labels.GetOrigin()])  # same grid, 2 m away
    moved = tmp_path / "moved_seg.nii.gz"
    sitk.WriteImage(labels, str(moved), True)
    from TSKDLib.data.case import load_case
    with pytest.raises(GeometryError, match="label volume does not overlap the image in physical space"):
        load_case(CT, moved, CT_MAP, classes=["liver"])
    code, out, err = _tskd(["inspect", CT, "--labels", moved, "--class-map", CT_MAP], capsys)
    assert code == 2 and "does not overlap" in _one_error_line(err)


# ------------------------------------------------------------------------------------------------
# 4. full disk, permission denied, read-only destination (monkeypatched errno)
# ------------------------------------------------------------------------------------------------
def _enospc_after_partial_write(real):
    def writer(*args, **kwargs):
        target = next(str(a) for a in args if isinstance(a, (str, Path)) and ".tmp-" in str(a))
        Path(target).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
    return writer


def test_segment_on_a_full_disk_one_line_previous_file_intact(tmp_path, package, capsys, monkeypatch):
    out = tmp_path / "pred.seg.nrrd"
    code, _, err = _tskd(["segment", package, CT, "--out", out, "--device", "cpu", "--quiet"], capsys)
    assert code == 0 and out.is_file(), err
    before = out.read_bytes()
    import slicerio
    monkeypatch.setattr(slicerio, "write_segmentation", _enospc_after_partial_write(slicerio.write_segmentation))
    code, _, err = _tskd(["segment", package, CT, "--out", out, "--device", "cpu", "--quiet", "--overwrite"], capsys)
    assert code == 2
    assert _one_error_line(err) == (f"tskd: error: {out}: could not write: no space left on device; the previous "
                                    "file, if any, is unchanged. Fix: Free some space on that disk (or write to "
                                    "another one) and run the command again.")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.seg.nrrd"]  # no partial temporary file


def test_nifti_write_itk_runtime_error_on_full_disk(tmp_path, monkeypatch):
    """SimpleITK reports a full disk as RuntimeError: with (almost) no free space it is ENOSPC."""
    import TSKDLib.data.io as io

    labels = sitk.Image(8, 8, 2, sitk.sitkUInt8)
    out = tmp_path / "x.nii.gz"

    def fail(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: Could not write file")
    monkeypatch.setattr(sitk, "WriteImage", fail)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(WriteError, match=r"x\.nii\.gz: could not write: no space left on device"):
        write_labelmap(labels, out, ClassMap([1], ["a"]))
    assert list(tmp_path.iterdir()) == []
    # With free space, an unknown writer failure is not disguised as a full disk.
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**6, 10**9 - 10**6))
    with pytest.raises(RuntimeError, match="Could not write file"):
        write_labelmap(labels, out, ClassMap([1], ["a"]))


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_read_only_or_denied_destination(tmp_path, monkeypatch, code, words):
    import tempfile as tf

    target = tmp_path / "state.json"
    target.write_text('{"old": true}')

    def denied(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path))
    monkeypatch.setattr(tf, "mkstemp", denied)
    with pytest.raises(WriteError) as e:
        atomic_write(target, lambda tmp: tmp.write_text("new"), overwrite=True)
    assert str(e.value) == (f"{target}: could not write: {words}; the previous file, if any, is unchanged. Fix: "
                            "Choose a folder you can write to (or fix its permissions) and run the command again.")
    assert target.read_text() == '{"old": true}'


def test_run_state_and_model_package_and_export_on_a_full_disk(tmp_path, package, monkeypatch):
    import TSKDLib.deploy.export as export
    from TSKDLib.pipeline.run import RunDir, copy_model_package

    # run state
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_state({"stages": {"prepare": {"done": True}}, "finished": False})
    before = run.state_path.read_bytes()
    real_write_text = Path.write_text

    def full(self, *a, **k):
        if ".tmp-" in self.name:
            real_write_text(self, "{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full)
        with pytest.raises(WriteError, match=r"state\.json: could not write: no space left on device"):
            run.mark_done("teacher", 1.0)
    assert run.state_path.read_bytes() == before
    assert sorted(p.name for p in run.path.iterdir()) == ["state.json"]

    # tskd export: the copy fails half-way; the destination keeps the previous package
    dest = tmp_path / "exported"
    copy_model_package(package, dest)
    card = (dest / "model_card.json").read_bytes()

    def copy_then_fail(src, dst, *a, **k):
        Path(dst).mkdir()
        (Path(dst) / "model.onnx").write_bytes(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(dst) / "model.onnx"))
    with monkeypatch.context() as m:
        m.setattr(shutil, "copytree", copy_then_fail)
        with pytest.raises(WriteError, match=r"exported: could not write: no space left on device"):
            copy_model_package(package, dest, overwrite=True)
    assert (dest / "model_card.json").read_bytes() == card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]

    # model package export (the training's last stage): the previous package stays in place
    def onnx_full(model, path, size):
        Path(path).write_bytes(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(export, "export_onnx", onnx_full)
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.distillation.student import build_student
    with pytest.raises(WriteError, match=r"exported: could not write: no space left on device"):
        export.export_model_package(build_student("unet-s", num_classes=2, input_size=64), dest,
                                    ClassMap([1, 5], ["spleen", "liver"]), Normalization.preset("ct").to_dict(),
                                    input_size=64, torchscript=False, overwrite=True)
    assert (dest / "model_card.json").read_bytes() == card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]


def test_cli_turns_a_stray_oserror_into_one_line(tmp_path, monkeypatch, capsys):
    """A write outside the guarded writers still ends in one line and exit 2, not a traceback."""
    import TSKDLib.data.case as case

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "cache"))
    monkeypatch.setattr(case, "load_case", denied)
    code, _, err = _tskd(["inspect", CT], capsys)
    assert code == 2
    assert _one_error_line(err).startswith(f"tskd: error: {tmp_path / 'cache'}: could not write: permission denied")


# ------------------------------------------------------------------------------------------------
# 5. one writer per run directory
# ------------------------------------------------------------------------------------------------
def test_second_lock_refuses_at_once_naming_the_holder(tmp_path):
    from TSKDLib.pipeline.runlock import LOCK_INFO_NAME, RunLock

    with RunLock(tmp_path / "run") as first:
        assert json.loads((tmp_path / "run" / LOCK_INFO_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"run: run directory is in use by process {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
        assert first.held
    assert not (tmp_path / "run" / LOCK_INFO_NAME).exists()  # released: the record is gone
    with RunLock(tmp_path / "run") as again:
        assert again.took_over is None


def test_train_refuses_a_locked_run_before_any_work(tmp_path):
    from TSKDLib.pipeline.run import train
    from TSKDLib.pipeline.runlock import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
            train([CT], [CT_SEG], out=run, class_map=CT_MAP, classes=["liver"], device="cpu")
        assert sorted(p.name for p in run.iterdir()) == [".tskd.lock", ".tskd.lock.json"]  # nothing else


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    from TSKDLib.pipeline.runlock import RunLock

    run = tmp_path / "run"
    code = ("import sys, time; from TSKDLib.pipeline.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by process {child.pid} on .*, started "):
            RunLock(run).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    lock = RunLock(run).acquire()  # the OS released the dead process's lock
    try:
        assert lock.took_over["pid"] == child.pid
        assert json.loads(lock.info_path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_slicer_resume_of_a_running_run_shows_the_refusal(tmp_path):
    """The module's Resume runs `tskd train` again: on a run still held it fails with one clear line."""
    sys.path.insert(0, str(ROOT / "TSKDSlicer"))
    try:
        from TSKDSlicerLib import jobs
    finally:
        sys.path.pop(0)
    from TSKDLib.pipeline.runlock import RunLock

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "TSKDLib"] + jobs.train_args([str(CT)], [str(CT_SEG)], str(run), device="cpu")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with RunLock(run):
        job = jobs.BackendJob(argv, env=env, cwd=str(tmp_path)).start()
        assert job.wait(timeout=300) == jobs.FAILED
    assert job.returncode == 2
    assert job.state.error_type == "RunLockedError"
    assert f"run directory is in use by process {os.getpid()}" in job.state.error
    assert job.state.summary().startswith("Failed: ")


# ------------------------------------------------------------------------------------------------
# the demo's data are found through an explicit folder (tskd demo --data), never by guessing
# ------------------------------------------------------------------------------------------------
def test_demo_without_its_data_is_one_line_naming_the_folder(tmp_path, capsys):
    code, _, err = _tskd(["demo", "--data", tmp_path / "nowhere", "--out", tmp_path / "out"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "nowhere" in line and "demo data not found" in line and "--data" in line
    from TSKDLib.pipeline.demo import DEFAULT_DATA_DIR, check_demo_data
    assert check_demo_data(Path(ROOT) / DEFAULT_DATA_DIR).is_dir()  # the checkout's default holds them
