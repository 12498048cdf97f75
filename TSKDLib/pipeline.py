"""The main job: prepare -> teacher fine-tune -> synthesis -> distillation -> export.

Python API (mirrors the ``tskd`` command)::

    import TSKDLib
    result = TSKDLib.train(["scan.nii.gz"], labels=["partial.seg.nrrd"], out="runs/liver", preset="fast")
    outputs = TSKDLib.segment(result.model_dir, ["new_scan.nii.gz"], out="predictions/")

Run directory layout (``docs/design.md``): ``config.json`` (effective config), ``state.json``
(stages done, timings), one folder per stage (each checkpoints and resumes), ``model/`` (the
exported model package). Running the same command on the same run directory resumes where it
stopped (even after SIGKILL); a finished run is never overwritten without ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config import DataConfig, PipelineConfig
from .errors import ConfigError, InputError, RunExistsError
from .io import atomic_dir, atomic_write
from .progress import NullProgress, ProgressReporter
from .runlock import LOCK_ITEMS, RunLock

log = logging.getLogger(__name__)

STAGES = ("prepare", "teacher", "synthesis", "distillation", "export")
#: What a run directory holds; ``--overwrite`` deletes these and nothing else, except the run's
#: lock (:mod:`TSKDLib.runlock`), which is held while the run is cleared and never deleted.
RUN_ITEMS = ("config.json", "state.json", *STAGES, "model", *LOCK_ITEMS)


# ------------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------------
class RunDir:
    """A run directory with its effective config and the state of each stage."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def state(self) -> dict:
        if not self.state_path.is_file():
            return {"stages": {}, "finished": False}
        return json.loads(self.state_path.read_text())

    def write_state(self, state: dict) -> None:
        text = json.dumps(state, indent=1)
        atomic_write(self.state_path, lambda tmp: tmp.write_text(text), overwrite=True)

    def mark_done(self, stage: str, seconds: float, **info) -> None:
        st = self.state()
        prev = st["stages"].get(stage, {})
        st["stages"][stage] = {"done": True, "seconds": round(prev.get("seconds_before", 0.0) + seconds, 2), **info}
        self.write_state(st)

    def add_time(self, stage: str, seconds: float) -> None:
        """Keep the time spent in an interrupted stage, so timings add up across resumes."""
        st = self.state()
        entry = st["stages"].setdefault(stage, {})
        entry["seconds_before"] = round(entry.get("seconds_before", 0.0) + seconds, 2)
        self.write_state(st)

    def is_done(self, stage: str) -> bool:
        return bool(self.state()["stages"].get(stage, {}).get("done"))

    def open(self, config: PipelineConfig, overwrite: bool) -> bool:
        """Create the run directory or check that it can be resumed; returns True if resuming.

        Raises :class:`RunExistsError` when the directory holds a finished run, a run with a
        different configuration, or other files, unless ``overwrite``."""
        if self.config_path.is_file():
            if overwrite:
                self.clear()
            else:
                old = PipelineConfig.from_dict(json.loads(self.config_path.read_text()))
                if self.state().get("finished"):
                    raise RunExistsError("holds a finished run.", self.path,
                                         "Choose a new --out folder, or pass --overwrite to train again.")
                if old.resume_key() != config.resume_key():
                    raise RunExistsError("holds an unfinished run with a different configuration.", self.path,
                                         "Run the same command to resume it, choose a new --out folder, "
                                         "or pass --overwrite.")
                self._write_config(config)  # device/threads may change on resume
                return True
        # A new run. Files already in the folder (for example the Slicer module's request) are
        # left alone: TSKD only ever writes and deletes its own items (RUN_ITEMS).
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_config(config)
        self.write_state({"stages": {}, "finished": False})
        return False

    def clear(self) -> None:
        """Delete this run's own items (never other files in the folder)."""
        for name in RUN_ITEMS:
            if name in LOCK_ITEMS:
                continue
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _write_config(self, config: PipelineConfig) -> None:
        text = json.dumps(config.to_dict(), indent=1)
        atomic_write(self.config_path, lambda tmp: tmp.write_text(text), overwrite=True)


# ------------------------------------------------------------------------------------------------
# Signals and devices
# ------------------------------------------------------------------------------------------------
@contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt (main thread only), so a stopped job unwinds cleanly:
    every checkpoint is written atomically and the run stays resumable."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def setup_device(device: str, threads: int | None, progress: ProgressReporter) -> str:
    """Resolve ``auto``, set the CPU thread count and the allocator thresholds
    (:func:`TSKDLib.runtime.tune_allocator`); says when a GPU would help."""
    import torch

    from .runtime import resolve_device, tune_allocator

    tune_allocator()
    if threads:
        torch.set_num_threads(int(threads))
    device = str(resolve_device(device))
    if device == "cpu":
        progress.log(f"running on the CPU with {torch.get_num_threads()} threads; a CUDA GPU would make "
                     "teacher fine-tuning, synthesis and distillation 10-50x faster.")
    return device


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` produced."""

    run_dir: Path
    model_dir: Path
    timings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def load_cases(data: DataConfig):
    """Read every image with its labels (see :func:`TSKDLib.case.load_case`)."""
    from .case import load_case

    cases = []
    for i, image in enumerate(data.images):
        labels = data.labels[i] if data.labels else None
        sl = data.labelled_slices[i] if data.labelled_slices else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case = load_case(image, labels, data.class_map, classes=data.classes, labelled_slices=sl,
                             axis=data.axis, mask_threshold=data.mask_threshold)
        for w in caught:
            log.warning("%s", w.message)
        cases.append(case)
    if not any(c.labelled is not None and c.labelled.any() for c in cases):
        from .errors import LabelError
        raise LabelError("no labelled slice in any scan.", data.labels[0] if data.labels else data.images[0],
                         "Label at least one slice (or list labelled slices with --labelled-slices).")
    return cases


def train(images: Sequence[str | Path] | None = None, labels: Sequence[str | Path] | None = None, *,
          out: str | Path, preset: str = "fast", class_map: str | Path | None = None,
          classes: Sequence[str] | None = None, labelled_slices: Sequence[Sequence[int] | None] | None = None,
          config: PipelineConfig | str | Path | None = None, overwrite: bool = False,
          device: str | None = None, threads: int | None = None,
          progress: ProgressReporter | None = None, synthesis: bool | None = None,
          axis: str | None = None) -> TrainResult:
    """Run the whole TS-KD job and export a student model package.

    Parameters
    ----------
    images, labels:
        Scans and their partial labels (one label file per scan; ``.seg.nrrd`` or label volume).
    out:
        Run directory. An unfinished run there with the same configuration is resumed.
    preset:
        ``fast`` | ``balanced`` | ``quality`` (see :mod:`TSKDLib.config`).
    class_map, classes, labelled_slices:
        See :func:`TSKDLib.case.load_case`; ``labelled_slices`` is one list per scan (the file's
        own slice indices along the slice axis).
    axis:
        Slice axis: ``acquisition`` (default: each scan's own slices, even when oblique),
        ``axial``, ``coronal`` or ``sagittal`` (:func:`TSKDLib.geometry.slice_frame`); recorded
        in the model package.
    config:
        A :class:`PipelineConfig` or a JSON file; explicit arguments override it.
    overwrite:
        Replace a finished run (or a run with another configuration) in ``out``.
    device, threads:
        ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; PyTorch CPU threads.
    progress:
        A :class:`ProgressReporter` (default: silent).

    Returns
    -------
    TrainResult
        ``model_dir`` holds the exported model package (``docs/design.md``).

    Raises
    ------
    TSKDError
        Bad inputs or configuration (:class:`InputError`, :class:`LabelError`,
        :class:`ConfigError`, :class:`RunExistsError`, :class:`RunLockedError` when another process
        holds the run directory, ...). ``KeyboardInterrupt`` (Ctrl-C or
        SIGTERM) leaves the run resumable.

    Multi-GPU: under ``torchrun --nproc_per_node=N`` (see :mod:`TSKDLib.distributed` and the
    README), rank 0 opens the run directory and alone runs prepare, synthesis, the teacher-output
    cache and export, and writes every file and progress event; the other ranks wait for it and
    load its outputs. Every rank joins teacher fine-tuning and distillation (DDP, one GPU each).
    Without torchrun nothing changes.
    """
    if isinstance(config, (str, Path)):
        config = PipelineConfig.from_file(config)
    cfg = config or PipelineConfig()
    cfg.preset = preset if config is None or preset != "fast" else cfg.preset
    if images:
        cfg.data.images = [str(p) for p in images]
    if labels:
        cfg.data.labels = [str(p) for p in labels]
    if class_map is not None:
        cfg.data.class_map = str(class_map)
    if classes:
        cfg.data.classes = list(classes)
    if labelled_slices is not None:
        cfg.data.labelled_slices = [None if s is None else [int(k) for k in s] for s in labelled_slices]
    if device:
        cfg.device = device
    if threads:
        cfg.threads = threads
    if synthesis is not None:
        cfg.synthesis_enabled = bool(synthesis)
    if cfg.synthesis_enabled is None:  # recorded in config.json as decided
        from .config import synthesis_default
        cfg.synthesis_enabled = synthesis_default(cfg.device)
    if axis:
        cfg.data.axis = str(axis)
    cfg.data.images = [str(Path(p).resolve()) for p in cfg.data.images]
    cfg.data.labels = [str(Path(p).resolve()) for p in cfg.data.labels]
    if cfg.data.class_map:
        cfg.data.class_map = str(Path(cfg.data.class_map).resolve())
    for p in cfg.data.images + cfg.data.labels:
        if not Path(p).exists():
            raise InputError("file not found.", p, "Check the path.")
    cfg.validate()
    progress = progress or NullProgress()
    from . import distributed  # imports torch: not at module level, `tskd segment` runs without it
    owns_group = distributed.init(cfg.device)  # no-op without torchrun
    if not distributed.is_main():
        progress = NullProgress()  # only rank 0 reports
    run = RunDir(out)
    # One writer per run directory (rank 0 under torchrun): a second train (or the Slicer module's
    # Resume) on the same folder refuses at once with RunLockedError naming the holder.
    lock = RunLock(run.path) if distributed.is_main() else None
    try:
        with stop_on_sigterm():
            if lock is not None:
                lock.acquire()
            resuming = distributed.run_on_main(lambda: run.open(cfg, overwrite))
            progress.start(str(run.path))
            if lock is not None and lock.took_over:
                progress.log(f"took over the stale lock of {RunLock.describe(lock.took_over)}", "warning")
            if resuming:
                progress.log(f"resuming the run in {run.path}")
            return _run(cfg, run, progress)
    finally:
        if lock is not None:
            lock.release()
        if owns_group:
            distributed.cleanup()


def _run(cfg: PipelineConfig, run: RunDir, progress: ProgressReporter) -> TrainResult:
    """The stages in order. Under torchrun, rank 0 runs prepare, synthesis, the teacher cache and
    export alone (:func:`distributed.run_on_main`, the others wait and then read its files); all
    ranks run teacher fine-tuning and distillation; only rank 0 writes in the run directory.
    Decisions to skip a finished stage are rank 0's, broadcast to all."""
    import torch

    from . import distributed

    main = distributed.is_main()
    device = setup_device(cfg.device, cfg.threads, progress)
    if distributed.is_active():  # one GPU per process: cuda -> cuda:LOCAL_RANK
        device = str(distributed.device_for(torch.device(device)))
    stage_cfgs = cfg.stage_configs()
    for key in ("teacher", "synthesis", "distillation"):
        if hasattr(stage_cfgs[key], "device"):
            stage_cfgs[key].device = device
    torch.manual_seed(cfg.seed)

    def timed(stage, fn, *args):
        t0 = time.monotonic()
        try:
            out = fn(*args)
        except BaseException:
            if main:
                run.add_time(stage, time.monotonic() - t0)
            raise
        return out, time.monotonic() - t0

    def stage_dir(stage: str) -> Path:  # only rank 0 creates folders
        return run.stage_dir(stage) if main else run.path / stage

    # 1. prepare (rank 0) -----------------------------------------------------------------------
    slices_path = stage_dir("prepare") / "slices.pt"
    from .case import SliceSet
    if distributed.broadcast(run.is_done("prepare") and slices_path.is_file()):
        slices = SliceSet.load(slices_path)
    else:
        def _prepare_stage():
            (_cases, sl), dt = timed("prepare", _prepare, cfg, run, progress)
            run.mark_done("prepare", dt, slices=len(sl), labelled=int(sl.labelled.sum()))
            return sl
        slices = distributed.run_on_main(_prepare_stage)
        if not main:
            slices = SliceSet.load(slices_path)

    # 2. teacher (every rank: DDP) ----------------------------------------------------------------
    from .teacher import build_teacher, finetune_teacher, load_teacher, save_teacher
    teacher_dir = stage_dir("teacher")
    final_teacher = teacher_dir / "final"
    teacher = None  # needed on rank 0 only after fine-tuning (synthesis, teacher cache)
    if distributed.broadcast(run.is_done("teacher") and final_teacher.is_dir()):
        if main:
            teacher = load_teacher(final_teacher, device=device)
    else:
        def _teacher():
            from .dataset import SliceDataset
            t = build_teacher(slices.class_map.names, stage_cfgs["teacher"])
            ds = SliceDataset(slices.labelled_subset(), augment=True, seed=cfg.seed)
            t, history = finetune_teacher(t, ds, stage_cfgs["teacher"], progress, work_dir=teacher_dir)
            if history.get("best_val_dice") == 0.0:  # held-out labelled slices exist, all missed
                from .errors import TSKDError
                raise TSKDError("the fine-tuned teacher's validation Dice is 0: it found none of the classes "
                                "on the held-out labelled slices, so the student would learn nothing.",
                                teacher_dir, "Check the labels and --labelled-slices / --axis (tskd inspect), "
                                "label more slices, or train longer (--preset balanced).")
            if main:
                save_teacher(t, final_teacher, stage_cfgs["teacher"], history)
            return t, history
        (teacher, history), dt = timed("teacher", _teacher)
        if main:
            run.mark_done("teacher", dt, val_dice=history.get("best_val_dice"))

    # 3. synthesis (rank 0) -----------------------------------------------------------------------
    synthetic = None
    if cfg.synthesis_enabled:
        from .synthesis import SyntheticTransferSet, run_synthesis
        syn_dir = stage_dir("synthesis")
        if distributed.broadcast(run.is_done("synthesis")):
            synthetic = SyntheticTransferSet.load(syn_dir / "transfer")
        else:
            def _synthesis():
                teacher.eval()
                syn, dt = timed("synthesis", lambda: run_synthesis(
                    slices, teacher.predict_proba, syn_dir, stage_cfgs["synthesis"], progress))
                run.mark_done("synthesis", dt, kept=len(syn),
                              mean_confidence=syn.manifest.get("metrics", {}).get("mean_confidence_kept"))
                return syn
            synthetic = distributed.run_on_main(_synthesis)
            if not main:
                synthetic = SyntheticTransferSet.load(syn_dir / "transfer")

    # 4. distillation (teacher cache: rank 0; training: every rank, DDP) ---------------------------
    from .distill import TeacherCache, TransferSet, build_teacher_cache, distill
    from .student import load_student
    dis_dir = stage_dir("distillation")
    student_path = dis_dir / "student.pt"
    if distributed.broadcast(run.is_done("distillation") and student_path.is_file()):
        student = load_student(student_path)
        dis_summary = json.loads((dis_dir / "summary.json").read_text())
    else:
        def _distill():
            transfer = TransferSet.build(slices, synthetic.images if synthetic is not None else None)
            cache_dir = dis_dir / "teacher_cache"

            def _cache():
                try:
                    cache = TeacherCache.load(cache_dir)
                    if len(cache) != len(transfer):
                        raise ValueError("stale cache")
                except Exception:
                    if cache_dir.exists():
                        shutil.rmtree(cache_dir)
                    teacher.eval()
                    progress.log(f"computing teacher outputs once for {len(transfer)} transfer slices")
                    cache = build_teacher_cache(teacher, transfer.images, directory=cache_dir)
                return cache
            cache = distributed.run_on_main(_cache)
            if not main:
                cache = TeacherCache.load(cache_dir)
            # Validation: the teacher's held-out labelled slices are too few to spare; report Dice
            # on all labelled slices (training fit) and the teacher's held-out validation Dice.
            init = cfg.distillation.get("init_student")
            student_arg = _initial_student(init, slices.class_map.num_classes) if init else stage_cfgs["student"]
            if init:
                progress.log(f"fine-tuning the existing student from {init}")
            res = distill(transfer, stage_cfgs["distillation"], cache, student=student_arg,
                          checkpoint_dir=dis_dir / "checkpoints", progress=progress,
                          validation=slices.labelled_subset())
            if not main:
                return res.model, None  # rank 0 writes the student and its summary
            from .distill import evaluate_dice, quality_gate
            lab = slices.labelled_subset()
            fit = evaluate_dice(res.model, lab.images, lab.labels, num_classes=slices.class_map.num_classes)
            check = res.metrics.get("final_check") or {}
            gate = quality_gate(slices.class_map.names, fit["per_class"], check.get("agreement"),
                                _teacher_val_per_class(final_teacher))
            for w in gate["warnings"]:
                progress.log(w, "warning")
            summary = {**res.training_summary(), "labelled_dice": fit["per_class"], "quality_gate": gate}
            from .student import save_student
            save_student(res.model, student_path)
            text = json.dumps(summary, indent=1, default=str)
            atomic_write(dis_dir / "summary.json", lambda tmp: tmp.write_text(text), overwrite=True)
            return res.model, summary
        (student, dis_summary), dt = timed("distillation", _distill)
        if main:
            run.mark_done("distillation", dt)

    # 5. export (rank 0) ----------------------------------------------------------------------------
    def _finish():
        if not run.is_done("export") or not (run.model_dir / "model_card.json").is_file():
            def _export():
                from .export import export_model_package
                progress.stage_start("export", 1)
                meta = _model_metadata(cfg, run, slices, dis_summary)
                export_model_package(student, run.model_dir, slices.class_map, meta.pop("normalization"),
                                     input_size=slices.size, slice_axis=cfg.data.axis, overwrite=True,
                                     acquisition=_acquisition_of(run), **meta)
                progress.update(1)
                progress.stage_end({})
            _, dt = timed("export", _export)
            run.mark_done("export", dt)
        st = run.state()
        st["finished"] = True
        run.write_state(st)
    distributed.run_on_main(_finish)
    if dis_summary is None:  # ranks > 0: rank 0's summary, written before export
        dis_summary = json.loads((dis_dir / "summary.json").read_text())

    st = run.state()
    timings = {k: v.get("seconds") for k, v in st["stages"].items()}
    val = st["stages"].get("teacher", {}).get("val_dice")
    gate = dis_summary.get("quality_gate") or {}
    metrics = {"teacher_val_dice": val,
               "student_labelled_dice": dict(zip(slices.class_map.names, dis_summary.get("labelled_dice") or [])),
               "student_teacher_agreement": gate.get("agreement"), "warnings": gate.get("warnings", [])}
    progress.done({"timings_s": timings, **metrics}, str(run.model_dir))
    return TrainResult(run.path, run.model_dir, timings, metrics)


def _teacher_val_per_class(teacher_dir: Path) -> list[float] | None:
    """The teacher's validation Dice per class at its best step, in its class order, from its
    saved ``teacher.json`` (``validation.dice``); None if unknown (no validation slices, or an
    unreadable teacher folder)."""
    try:
        from .teacher import read_teacher_meta
        meta = read_teacher_meta(teacher_dir)
    except Exception:  # the gate then uses its fixed floor
        return None
    dice = (meta.get("validation") or {}).get("dice") or {}
    if not dice:
        return None
    return [float("nan") if dice.get(n) is None else float(dice[n]) for n in meta.get("class_names", [])]


def _initial_student(path: str | Path, num_classes: int):
    """The PyTorch student of a previous run (model package or run directory) to start from."""
    from .errors import ConfigError
    from .student import load_student

    p = Path(path)
    candidates = [p / "student.pt", p / "distillation" / "student.pt", p.parent / "distillation" / "student.pt"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError("no PyTorch student weights found to fine-tune from.", p,
                          "Point at the run directory (or its model/ folder) of a TSKD training, "
                          "or rerun the whole pipeline instead.")
    model = load_student(found)
    k = int(getattr(getattr(model, "config", None), "num_classes", num_classes))
    if k != num_classes:
        raise ConfigError(f"the student in {found} has {k} classes, this task {num_classes}.", p,
                          "Fine-tune only with the same classes, or rerun the whole pipeline.")
    return model


def _prepare(cfg: PipelineConfig, run: RunDir, progress: ProgressReporter):
    from .case import check_label_coverage, prepare_slices
    from .preprocess import Normalization

    progress.stage_start("prepare", len(cfg.data.images))
    cases = []
    for i, path in enumerate(cfg.data.images):
        sub = DataConfig(**{**cfg.data.__dict__, "images": [path],
                            "labels": [cfg.data.labels[i]] if cfg.data.labels else [],
                            "labelled_slices": [cfg.data.labelled_slices[i]] if cfg.data.labelled_slices else None})
        cases.extend(load_cases(sub) if sub.labels else _load_unlabelled(sub))
        progress.update(i + 1, message=Path(path).name)
    for w in check_label_coverage(cases):  # LabelError when a class is on no labelled slice
        progress.log(w, "warning")
    norm = None if cfg.data.normalization == "auto" else Normalization.preset(cfg.data.normalization)
    slices = prepare_slices(cases, cfg.data.size, norm)
    slices.save(run.stage_dir("prepare") / "slices.pt")
    counts = {name: int(sum(((slices.labels[slices.labelled] == k + 1).flatten(1).any(1)).tolist()))
              for k, name in enumerate(slices.class_map.names)}
    info = {"cases": [{"name": c.name, "image": c.image_path, "modality": c.modality,
                       "labelled_slices": c.labelled_indices(), "slices": c.num_slices, **c.axis_info()}
                      for c in cases],
            "labelled_slices_per_class": counts,
            "normalization": _normalization_of(cases[0], norm)}
    text = json.dumps(info, indent=1)
    atomic_write(run.stage_dir("prepare") / "cases.json", lambda tmp: tmp.write_text(text), overwrite=True)
    for name, n in counts.items():
        if n == 0:
            progress.log(f"class '{name}' appears in no labelled slice: the model cannot learn it.", "warning")
    for c in cases:
        msg = adjacent_slices_warning(c.labelled_indices(), c.num_slices)
        if msg:
            progress.log(f"{c.name}: {msg}", "warning")
    progress.stage_end({"slices": len(slices), "labelled": int(slices.labelled.sum()), **counts})
    return cases, slices


def adjacent_slices_warning(labelled: Sequence[int], num_slices: int) -> str | None:
    """A warning when 3 or more labelled slices are all adjacent (no spread) in a scan of twice as
    many slices: the teacher then never sees the organ's other parts, and new scans and organ
    ends suffer (Zhang et al., MIDL 2025, arXiv 2412.08081: spread-out slices train better).
    Returns None when the labels are spread (or too few to judge)."""
    idx = sorted(int(i) for i in labelled)
    if len(idx) < 3 or num_slices < 2 * len(idx) or idx[-1] - idx[0] + 1 != len(idx):
        return None
    return (f"the labelled slices {idx[0]}-{idx[-1]} are all adjacent: the model will do worse on new scans "
            "and at the organs' ends. Label slices spread over each organ (e.g. at 25, 50 and 75 % of "
            "its extent) instead.")


def _acquisition_of(run: RunDir) -> dict:
    """The training scans' acquisition planes and slice normals (from prepare/cases.json)."""
    cases = json.loads((run.path / "prepare" / "cases.json").read_text())["cases"]
    return {"planes": [c.get("acquisition_plane") for c in cases if c.get("slice_normal")],
            "directions": [c["slice_normal"] for c in cases if c.get("slice_normal")]}


def _load_unlabelled(sub: DataConfig):
    from .case import load_case
    return [load_case(p, None, sub.class_map, axis=sub.axis) for p in sub.images]


def _normalization_of(case, norm) -> dict:
    from .preprocess import Normalization
    n = norm or Normalization.for_modality(case.modality, case.image_slices())
    return n.to_dict()


def _model_metadata(cfg: PipelineConfig, run: RunDir, slices, summary: dict) -> dict:
    """Model-card entries: normalisation, name, training summary, validation, teacher."""
    info = json.loads((run.path / "prepare" / "cases.json").read_text())
    state = run.state()["stages"]
    teacher_meta: dict = {}
    try:
        from .teacher import read_teacher_meta
        teacher_meta = read_teacher_meta(run.path / "teacher" / "final")
    except Exception as exc:  # the card then lacks the teacher details, nothing else
        log.warning("teacher metadata not read: %s", exc)
    names = slices.class_map.names
    val = _teacher_val_per_class(run.path / "teacher" / "final")
    val = dict(zip(names, val)) if val else None
    dice = {}
    if isinstance(summary.get("labelled_dice"), (list, tuple)):
        dice = dict(zip(names, summary["labelled_dice"]))
    return {"normalization": info["normalization"], "name": run.path.name,
            "training": {"scans": [c["image"] for c in info["cases"]],
                         "run_dir": str(run.path.resolve()),  # for `tskd update` (teacher outputs)
                         "labelled_slices": {c["name"]: c["labelled_slices"] for c in info["cases"]},
                         "labelled_slices_per_class": info["labelled_slices_per_class"],
                         "preset": cfg.preset, "synthesis": cfg.synthesis_enabled, "seed": cfg.seed,
                         "stage_seconds": {k: v.get("seconds") for k, v in state.items()},
                         "distillation": summary},
            "validation": {"dice": dice, "teacher_val_dice": state.get("teacher", {}).get("val_dice"),
                           "teacher_val_dice_per_class": val,
                           "quality_gate": summary.get("quality_gate"),
                           "warnings": (summary.get("quality_gate") or {}).get("warnings", []),
                           "note": "dice: the student's Dice on the labelled slices (training fit); "
                                   "teacher_val_dice: the teacher's Dice on labelled slices held out from its training"},
            "teacher": teacher_meta}


# ------------------------------------------------------------------------------------------------
# Segmenting
# ------------------------------------------------------------------------------------------------
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")


def resolve_model_dir(path: str | Path) -> Path:
    """A model package directory, or a run directory's ``model/``."""
    p = Path(path)
    if not (p / "model_card.json").is_file() and (p / "model" / "model_card.json").is_file():
        return p / "model"
    return p


def segment(model_dir: str | Path, images: Sequence[str | Path], out: str | Path, fmt: str | None = None,
            cleanup: bool = True, overwrite: bool = False, progress: ProgressReporter | None = None,
            device: str | None = None, largest_component: bool = False, axis: str | None = None) -> list[dict]:
    """Segment scans with an exported student (onnxruntime; no PyTorch needed).

    Parameters
    ----------
    model_dir:
        Model package (or run directory).
    images:
        Volume files, DICOM folders or 2D images.
    out:
        One image: an output file (``.nii.gz``, ``.nrrd``, ``.seg.nrrd``) or a folder. Several
        images: a folder; files are named ``<input name>.<fmt>`` (default ``seg.nrrd``).
    cleanup:
        3D clean-up per class: remove islands under 50 mm^3 and fill enclosed holes
        (``largest_component`` also keeps only the largest component of each class).
    device:
        ``cpu`` forces the CPU provider; ``auto``/``cuda`` use CUDA when onnxruntime has it.
    axis:
        Optional: the slice axis the caller expects; the model's own (``slice_axis`` in its card)
        is always used, and a different one is a :class:`ConfigError`. Scans acquired in another
        plane than an ``acquisition`` model's training scans are refused
        (:func:`TSKDLib.inference.check_acquisition_plane`, :class:`InputError`).

    Returns
    -------
    list of ``{"input", "output", "seconds", "timings"}``.
    """
    from .inference import Cleanup, load_model_package, segment_file

    progress = progress or NullProgress()
    providers = ["CPUExecutionProvider"] if device == "cpu" else None
    pkg = load_model_package(resolve_model_dir(model_dir), providers=providers)
    if axis and axis != pkg.slice_axis:
        raise ConfigError(f"the model was trained on {pkg.slice_axis} slices, not {axis}.", pkg.path,
                          f"Drop --axis or pass --axis {pkg.slice_axis}; to slice along {axis}, train a model with it.")
    out = Path(out)
    single_file = len(images) == 1 and out.name.lower().endswith(OUTPUT_SUFFIXES)
    fmt = (fmt or "seg.nrrd").lstrip(".")
    clean = Cleanup(min_island_mm3=50.0, largest_component=largest_component, fill_holes=True) if cleanup else None
    results = []
    progress.stage_start("segment", len(images))
    for i, image in enumerate(images):
        stem = Path(str(image).rstrip("/")).name
        for suf in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".jpeg"):
            if stem.lower().endswith(suf):
                stem = stem[: -len(suf)]
                break
        target = out if single_file else out / f"{stem}.{fmt}"
        t0 = time.monotonic()
        timings: dict = {}
        segment_file(pkg, image, target, overwrite=overwrite, cleanup=clean, timings=timings)
        dt = time.monotonic() - t0
        results.append({"input": str(image), "output": str(target), "seconds": dt, "timings": timings})
        progress.update(i + 1, metrics={"seconds": round(dt, 3)}, message=str(target))
    progress.stage_end({"scans": len(images)})
    return results


def copy_model_package(src: str | Path, dest: str | Path, overwrite: bool = False) -> Path:
    """Verify a model package (checksums, ONNX loads) and copy it atomically to ``dest``."""
    from .inference import load_model_package

    src, dest = resolve_model_dir(src), Path(dest)
    load_model_package(src)
    if dest.exists() and not overwrite:
        raise RunExistsError("destination exists.", dest, "Choose a new folder or pass --overwrite.")
    with atomic_dir(dest, create=False) as tmp:  # full disk / permission / read-only: dest unchanged
        shutil.copytree(src, tmp)
    return dest
