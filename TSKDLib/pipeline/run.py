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

import copy
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

from TSKDLib.pipeline.config import DataConfig, PipelineConfig
from TSKDLib.errors import ConfigError, InputError, RunExistsError
from TSKDLib.data.io import atomic_dir, atomic_write
from TSKDLib.pipeline.progress import NullProgress, ProgressReporter
from TSKDLib.pipeline.runlock import LOCK_ITEMS, RunLock

log = logging.getLogger(__name__)

STAGES = ("prepare", "teacher", "synthesis", "distillation", "export")
#: What a run directory holds; ``--overwrite`` deletes these and nothing else, except the run's
#: lock (:mod:`TSKDLib.pipeline.runlock`), which is held while the run is cleared and never deleted.
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
    (:func:`TSKDLib.engine.runtime.tune_allocator`); says when a GPU would help."""
    import torch

    from TSKDLib.engine.runtime import resolve_device, tune_allocator

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


def load_cases(data: DataConfig, on_case=None) -> list:
    """Read every image with its labels (:func:`TSKDLib.data.case.load_case`), in order;
    ``on_case(i, path)`` (optional) after each.

    Raises :class:`~TSKDLib.errors.LabelError` when no scan has a labelled slice (checked over
    all scans together: one scan without labels among labelled ones is fine)."""
    from TSKDLib.data.case import load_case

    cases = []
    for i, image in enumerate(data.images):
        labels = data.labels[i] if data.labels else None
        if labels is None:
            cases.append(load_case(image, None, data.class_map, axis=data.axis))
        else:
            sl = data.labelled_slices[i] if data.labelled_slices else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cases.append(load_case(image, labels, data.class_map, classes=data.classes, labelled_slices=sl,
                                       axis=data.axis, mask_threshold=data.mask_threshold))
            for w in caught:
                log.warning("%s", w.message)
        if on_case is not None:
            on_case(i, image)
    if not any(c.labelled is not None and c.labelled.any() for c in cases):
        from TSKDLib.errors import LabelError
        raise LabelError(f"no labelled slice in any of the {len(cases)} scan(s).",
                         data.labels[0] if data.labels else data.images[0],
                         "Label at least one slice (or list labelled slices with --labelled-slices).")
    return cases


def _effective_config(config: PipelineConfig | str | Path | None, preset: str | None, **given) -> PipelineConfig:
    """A new :class:`PipelineConfig`: ``config`` (object, JSON file or the defaults; never changed),
    then every argument that was given (not None), paths made absolute, synthesis decided."""
    if isinstance(config, (str, Path)):
        cfg = PipelineConfig.from_file(config)
    else:
        cfg = copy.deepcopy(config) if config is not None else PipelineConfig()
    if preset is not None:  # explicit wins over the config file's preset
        cfg.preset = preset
    d = cfg.data
    if given["images"]:
        d.images = [str(p) for p in given["images"]]
    if given["labels"]:
        d.labels = [str(p) for p in given["labels"]]
    if given["class_map"] is not None:
        d.class_map = str(given["class_map"])
    if given["classes"]:
        d.classes = list(given["classes"])
    if given["labelled_slices"] is not None:
        d.labelled_slices = [None if s is None else [int(k) for k in s] for s in given["labelled_slices"]]
    if given["axis"]:
        d.axis = str(given["axis"])
    cfg.device = given["device"] or cfg.device
    cfg.threads = given["threads"] or cfg.threads
    if given["synthesis"] is not None:
        cfg.synthesis_enabled = bool(given["synthesis"])
    if cfg.synthesis_enabled is None:  # off unless asked (PipelineConfig); recorded in config.json
        cfg.synthesis_enabled = False
    d.images = [str(Path(p).resolve()) for p in d.images]
    d.labels = [str(Path(p).resolve()) for p in d.labels]
    if d.class_map:
        d.class_map = str(Path(d.class_map).resolve())
    for p in d.images + d.labels:
        if not Path(p).exists():
            raise InputError("file not found.", p, "Check the path.")
    return cfg.validate()


def train(images: Sequence[str | Path] | None = None, labels: Sequence[str | Path] | None = None, *,
          out: str | Path, preset: str | None = None, class_map: str | Path | None = None,
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
        ``fast`` | ``balanced`` | ``quality`` (:data:`TSKDLib.pipeline.presets.PRESETS`). Given, it wins
        over the preset of ``config``; None: the config's preset (``fast`` without a config).
    class_map, classes, labelled_slices:
        See :func:`TSKDLib.data.case.load_case`; ``labelled_slices`` is one list per scan (the file's
        own slice indices along the slice axis).
    axis:
        Slice axis: ``acquisition`` (default: each scan's own slices, even when oblique),
        ``axial``, ``coronal`` or ``sagittal`` (:func:`TSKDLib.data.geometry.slice_frame`); recorded
        in the model package.
    config:
        A :class:`PipelineConfig` or a JSON file; explicit arguments override it. It is never
        changed: the run works on a copy.
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

    Multi-GPU: under ``torchrun --nproc_per_node=N`` (see :mod:`TSKDLib.engine.distributed` and the
    README), rank 0 opens the run directory and alone runs prepare, synthesis, the teacher-output
    cache and export, and writes every file and progress event; the other ranks wait for it and
    load its outputs. Every rank joins teacher fine-tuning and distillation (DDP, one GPU each).
    Without torchrun nothing changes.
    """
    cfg = _effective_config(config, preset, images=images, labels=labels, class_map=class_map, classes=classes,
                            labelled_slices=labelled_slices, device=device, threads=threads, synthesis=synthesis,
                            axis=axis)
    return _open_and_run(cfg, RunDir(out), overwrite, progress or NullProgress())


def _open_and_run(cfg: PipelineConfig, run: RunDir, overwrite: bool, progress: ProgressReporter) -> TrainResult:
    """Join torchrun's process group, lock and open the run directory (rank 0), run the job."""
    from TSKDLib.engine import distributed  # imports torch: not at module level, `tskd segment` runs without it
    owns_group = distributed.init(cfg.device)  # no-op without torchrun
    if not distributed.is_main():
        progress = NullProgress()  # only rank 0 reports
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
    """The stages in order (:class:`_Job`). Under torchrun, rank 0 runs prepare, synthesis, the
    teacher cache and export alone (the others wait, then read its files); all ranks run teacher
    fine-tuning and distillation; only rank 0 writes in the run directory."""
    import torch

    from TSKDLib.engine import distributed

    device = setup_device(cfg.device, cfg.threads, progress)
    if distributed.is_active():  # one GPU per process: cuda -> cuda:LOCAL_RANK
        device = str(distributed.device_for(torch.device(device)))
    torch.manual_seed(cfg.seed)
    job = _Job(cfg, run, progress, cfg.stage_configs(device=device))
    prepared = job.prepare()
    teacher = job.teacher(prepared)
    synthetic = job.synthesis(prepared, teacher) if cfg.synthesis_enabled else None
    student, summary = job.distillation(prepared, teacher, synthetic)
    job.export(prepared, teacher, student, summary)
    st = run.state()
    timings = {k: v.get("seconds") for k, v in st["stages"].items()}
    gate = summary.get("quality_gate") or {}
    names = prepared.slices.class_map.names
    metrics = {"teacher_val_dice": st["stages"].get("teacher", {}).get("val_dice"),
               "student_labelled_dice": dict(zip(names, summary.get("labelled_dice") or [])),
               "student_teacher_agreement": gate.get("agreement"), "warnings": gate.get("warnings", [])}
    progress.done({"timings_s": timings, **metrics}, str(run.model_dir))
    return TrainResult(run.path, run.model_dir, timings, metrics)


@dataclass
class _Prepared:
    """The prepare stage's outputs, read from ``prepare/``: the slices and ``cases.json``."""

    slices: object  # TSKDLib.data.case.SliceSet
    info: dict


class _TeacherFiles:
    """The teacher stage's outputs in ``teacher/final``: the model (loaded on first use, rank 0
    only: synthesis and the teacher cache need it) and its metadata (``teacher.json``)."""

    def __init__(self, final: Path, device: str):
        self.final, self.device = final, device
        self._model = self._meta = None

    @property
    def model(self):
        if self._model is None:
            from TSKDLib.teacher import load_teacher
            self._model = load_teacher(self.final, device=self.device)
        return self._model

    @property
    def meta(self) -> dict:
        """``teacher.json`` ({} when unreadable: the card then lacks the teacher details)."""
        if self._meta is None:
            try:
                from TSKDLib.teacher import read_teacher_meta
                self._meta = read_teacher_meta(self.final)
            except Exception as exc:
                log.warning("teacher metadata not read: %s", exc)
                self._meta = {}
        return self._meta


class _Job:
    """The five stages of :func:`train`. Files are the contract between them: each stage reads its
    inputs from the run directory and writes its outputs there, and every stage's outputs are
    read back from those files (:meth:`_stage`), so a first run and a resumed run take one path."""

    def __init__(self, cfg: PipelineConfig, run: RunDir, progress: ProgressReporter, stage_cfgs: dict):
        from TSKDLib.engine import distributed

        self.cfg, self.run, self.progress, self.stage_cfgs = cfg, run, progress, stage_cfgs
        self.distributed, self.main = distributed, distributed.is_main()

    def dir(self, stage: str) -> Path:
        """A stage's folder (created by rank 0 only)."""
        return self.run.stage_dir(stage) if self.main else self.run.path / stage

    def _stage(self, name: str, outputs: Sequence[Path], produce, load, every_rank: bool = False):
        """If ``name`` is done and its ``outputs`` exist, nothing runs; else ``produce()`` runs on
        rank 0 (the others wait) or, with ``every_rank``, on every rank (DDP training; rank 0
        writes), timed into ``state.json`` (also when interrupted) with the dict it returns.
        Then every rank returns ``load()``, which reads the outputs. Rank 0 decides."""
        dist = self.distributed
        if not dist.broadcast(self.run.is_done(name) and all(p.exists() for p in outputs)):
            def work():
                t0 = time.monotonic()
                try:
                    info = produce() or {}
                except BaseException:
                    if self.main:
                        self.run.add_time(name, time.monotonic() - t0)
                    raise
                if self.main:
                    self.run.mark_done(name, time.monotonic() - t0, **info)
            if every_rank:
                work()
                dist.barrier()  # rank 0's files are written before anyone reads them
            else:
                dist.run_on_main(work)
        return load()

    # -- 1. prepare (rank 0) ----------------------------------------------------------------------
    def prepare(self) -> _Prepared:
        from TSKDLib.data.case import SliceSet

        folder = self.dir("prepare")

        def produce():
            slices = _prepare(self.cfg, folder, self.progress)
            return {"slices": len(slices), "labelled": int(slices.labelled.sum())}

        def load():
            info = json.loads((folder / "cases.json").read_text())
            slices = SliceSet.load(folder / "slices.pt")
            if slices.intensity is None:  # prepared before SliceSet.intensity existed
                slices.intensity = info.get("normalization", {}).get("kind")
            return _Prepared(slices, info)
        return self._stage("prepare", [folder / "slices.pt", folder / "cases.json"], produce, load)

    # -- 2. teacher (every rank: DDP) ---------------------------------------------------------------
    def teacher(self, prepared: _Prepared) -> _TeacherFiles:
        folder, tcfg = self.dir("teacher"), self.stage_cfgs["teacher"]
        final = folder / "final"

        def produce():
            from TSKDLib.data.dataset import SliceDataset
            from TSKDLib.teacher import build_teacher, finetune_teacher, save_teacher
            slices = prepared.slices
            t = build_teacher(slices.class_map.names, tcfg)
            ds = SliceDataset(slices.labelled_subset(), augment=True, seed=self.cfg.seed)
            t, history = finetune_teacher(t, ds, tcfg, self.progress, work_dir=folder)
            if history.get("best_val_dice") == 0.0:  # held-out labelled slices exist, all missed
                from TSKDLib.errors import TSKDError
                raise TSKDError("the fine-tuned teacher's validation Dice is 0: it found none of the classes "
                                "on the held-out labelled slices, so the student would learn nothing.",
                                folder, "Check the labels and --labelled-slices / --axis (tskd inspect), "
                                "label more slices, or train longer (--preset balanced).")
            if self.main:
                save_teacher(t, final, tcfg, history)
            return {"val_dice": history.get("best_val_dice")}
        return self._stage("teacher", [final], produce, lambda: _TeacherFiles(final, tcfg.device),
                           every_rank=True)

    # -- 3. synthesis (rank 0) ------------------------------------------------------------------------
    def synthesis(self, prepared: _Prepared, teacher: _TeacherFiles):
        from TSKDLib.synthesis import SyntheticTransferSet, run_synthesis

        folder = self.dir("synthesis")

        def produce():
            model = teacher.model
            model.eval()
            syn = run_synthesis(prepared.slices, model.predict_proba, folder, self.stage_cfgs["synthesis"],
                                self.progress)
            return {"kept": len(syn), "mean_confidence": syn.manifest.get("metrics", {}).get("mean_confidence_kept")}
        return self._stage("synthesis", [folder / "transfer" / "manifest.json"], produce,
                           lambda: SyntheticTransferSet.load(folder / "transfer"))

    # -- 4. distillation (teacher cache: rank 0; training: every rank, DDP) ---------------------------
    def _teacher_cache(self, transfer, teacher: _TeacherFiles, folder: Path):
        """The teacher's outputs on the transfer set, computed once by rank 0 into ``folder``."""
        from TSKDLib.distillation.distill import TeacherCache, build_teacher_cache

        def build():
            try:
                cache = TeacherCache.load(folder)
                if len(cache) == len(transfer):
                    return
            except Exception:
                pass
            if folder.exists():
                shutil.rmtree(folder)
            model = teacher.model
            model.eval()
            self.progress.log(f"computing teacher outputs once for {len(transfer)} transfer slices")
            build_teacher_cache(model, transfer.images, directory=folder)
        self.distributed.run_on_main(build)
        return TeacherCache.load(folder)

    def distillation(self, prepared: _Prepared, teacher: _TeacherFiles, synthetic) -> tuple:
        from TSKDLib.distillation.distill import TransferSet, distill
        from TSKDLib.distillation.student import load_student

        folder = self.dir("distillation")
        slices = prepared.slices

        def produce():
            syn = synthetic.images if synthetic is not None else None
            transfer = TransferSet.build(slices, syn)
            cache = self._teacher_cache(transfer, teacher, folder / "teacher_cache")
            # the student learns the scans intensity-standardised; the teacher's outputs stay as cached
            factors = _training_factors(prepared.info, slices.class_map.names,
                                        self.stage_cfgs["distillation"].standardize)
            std = slices.with_intensity_factors(factors)
            if std is not slices:
                self.progress.log("intensity standardisation of the training scans: " + ", ".join(
                    f"{name} x{f:.2f}" for name, f in zip(slices.case_names, factors)))
                transfer = TransferSet.build(std, syn)
            # Validation: the teacher's held-out labelled slices are too few to spare; report Dice
            # on all labelled slices (training fit) and the teacher's held-out validation Dice.
            init = self.cfg.distillation.get("init_student")
            student = _initial_student(init, slices.class_map.num_classes) if init else self.stage_cfgs["student"]
            if init:
                self.progress.log(f"fine-tuning the existing student from {init}")
            res = distill(transfer, self.stage_cfgs["distillation"], cache, student=student,
                          checkpoint_dir=folder / "checkpoints", progress=self.progress,
                          validation=std.labelled_subset())
            res.metrics["intensity_factors"] = [round(float(f), 4) for f in factors]
            if self.main:  # rank 0 writes the student and its summary
                self._write_student(res, std, teacher, folder)

        def load():
            return load_student(folder / "student.pt"), json.loads((folder / "summary.json").read_text())
        return self._stage("distillation", [folder / "student.pt", folder / "summary.json"], produce, load,
                           every_rank=True)

    def _write_student(self, res, slices, teacher: _TeacherFiles, folder: Path) -> None:
        """The quality gate (warnings), ``student.pt`` and ``summary.json``."""
        from TSKDLib.distillation.distill import evaluate_dice, quality_gate
        from TSKDLib.distillation.student import save_student

        lab = slices.labelled_subset()
        fit = evaluate_dice(res.model, lab.images, lab.labels, num_classes=slices.class_map.num_classes)
        check = res.metrics.get("final_check") or {}
        gate = quality_gate(slices.class_map.names, fit["per_class"], check.get("agreement"),
                            _teacher_val_per_class(teacher.meta))
        for w in gate["warnings"]:
            self.progress.log(w, "warning")
        summary = {**res.training_summary(), "labelled_dice": fit["per_class"], "quality_gate": gate}
        save_student(res.model, folder / "student.pt")
        text = json.dumps(summary, indent=1, default=str)
        atomic_write(folder / "summary.json", lambda tmp: tmp.write_text(text), overwrite=True)

    # -- 5. export (rank 0) -------------------------------------------------------------------------
    def export(self, prepared: _Prepared, teacher: _TeacherFiles, student, summary: dict) -> None:
        run, cfg, progress = self.run, self.cfg, self.progress

        def produce():
            from TSKDLib.deploy.export import export_model_package
            progress.stage_start("export", 1)
            meta = _model_metadata(cfg, run, prepared, teacher.meta, summary)
            norm = _card_normalization(prepared.info, (summary.get("metrics") or {}).get("intensity_factors"))
            export_model_package(student, run.model_dir, prepared.slices.class_map, norm,
                                 input_size=prepared.slices.size, slice_axis=cfg.data.axis, overwrite=True,
                                 acquisition=_acquisition_of(prepared.info),
                                 postprocessing=_postprocessing(prepared.slices.class_map.names, summary,
                                                                prepared.info), **meta)
            progress.update(1)
            progress.stage_end({})
        self._stage("export", [run.model_dir / "model_card.json"], produce, lambda: None)

        def finish():
            st = run.state()
            st["finished"] = True
            run.write_state(st)
        self.distributed.run_on_main(finish)


def _postprocessing(names: Sequence[str], summary: dict, info: dict | None = None) -> dict:
    """The model card's ``postprocessing`` entry: the one-object classes (the user's labels, joined
    through the teacher's prediction, form one 3D object in every scan): ``tskd segment`` removes
    their components smaller than a fifth (``min_fraction``) of the largest one, and those lying
    far from where the class lay in the training scans (``locations``: mean over the scans of
    ``cases.json``'s ``class_locations_mm``), and gives a removed part that touches another
    one-object class where that class lies to it (see :class:`TSKDLib.deploy.inference.Cleanup`)."""
    from TSKDLib.deploy.inference import (
        LOCATION_MARGIN_MM,
        ONE_OBJECT_MIN_FRACTION,
        mean_class_locations,
    )
    from TSKDLib.distillation.distill import single_object_classes
    single = [names[c - 1] for c in single_object_classes((summary.get("metrics") or {}).get("pseudo_labels"))]
    per_scan = [case.get("class_locations_mm") or {} for case in (info or {}).get("cases", [])]
    locations = {name: {"centre_mm": [round(x, 2), round(y, 2)], "radius_mm": round(r, 2)}
                 for name, (x, y, r) in mean_class_locations(per_scan, single).items()}
    return {"one_object": single, "min_fraction": ONE_OBJECT_MIN_FRACTION,
            "locations": locations, "location_margin_mm": LOCATION_MARGIN_MM,
            "note": "one 3D object each in the training scans: tskd segment removes their connected "
                    "components smaller than a fifth of the largest one, and parts whose centre lies "
                    "farther from where the class lay (locations: LPS x, y mm from the scan's centre) "
                    "than the best-placed part's by more than location_margin_mm or twice the class's "
                    "radius; a removed part of at least 1 mL touching another one-object class where "
                    "that class lies joins it (--all-components keeps all)"}


def _teacher_val_per_class(meta: dict) -> list[float] | None:
    """The teacher's validation Dice per class at its best step, in its class order, from its
    ``teacher.json`` (``validation.dice``); None if unknown (no validation slices, or an
    unreadable teacher folder: the quality gate then uses its fixed floor)."""
    dice = (meta.get("validation") or {}).get("dice") or {}
    if not dice:
        return None
    return [float("nan") if dice.get(n) is None else float(dice[n]) for n in meta.get("class_names", [])]


def _initial_student(path: str | Path, num_classes: int):
    """The PyTorch student of a previous run (model package or run directory) to start from."""
    from TSKDLib.errors import ConfigError
    from TSKDLib.distillation.student import load_student

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


def _prepare(cfg: PipelineConfig, folder: Path, progress: ProgressReporter):
    """Stage 1: read the scans, check the labels, normalise and resize every slice; writes
    ``folder/slices.pt`` (:class:`TSKDLib.data.case.SliceSet`) and ``folder/cases.json`` (the scans,
    labelled slices, per-class counts and the normalisation every scan was prepared with).
    Returns the slices."""
    from TSKDLib.data.case import check_label_coverage, prepare_slices
    from TSKDLib.deploy.inference import case_class_intensities

    progress.stage_start("prepare", len(cfg.data.images))
    cases = load_cases(cfg.data, lambda i, path: progress.update(i + 1, message=Path(path).name))
    for w in check_label_coverage(cases):  # LabelError when a class is on no labelled slice
        progress.log(w, "warning")
    norm = _normalization_for(cases, cfg.data.normalization)
    slices = prepare_slices(cases, cfg.data.size, norm)
    slices.save(folder / "slices.pt")
    counts = {name: int(sum(((slices.labels[slices.labelled] == k + 1).flatten(1).any(1)).tolist()))
              for k, name in enumerate(slices.class_map.names)}
    info = {"cases": [{"name": c.name, "image": c.image_path, "modality": c.modality,
                       "labelled_slices": c.labelled_indices(), "slices": c.num_slices, **c.axis_info(),
                       "class_locations_mm": _class_locations(c),
                       "class_intensity_medians": case_class_intensities(c, norm)}
                      for c in cases],
            "labelled_slices_per_class": counts, "normalization": norm.to_dict()}
    text = json.dumps(info, indent=1)
    atomic_write(folder / "cases.json", lambda tmp: tmp.write_text(text), overwrite=True)
    for name, n in counts.items():
        if n == 0:
            progress.log(f"class '{name}' appears in no labelled slice: the model cannot learn it.", "warning")
    for c in cases:
        msg = adjacent_slices_warning(c.labelled_indices(), c.num_slices)
        if msg:
            progress.log(f"{c.name}: {msg}", "warning")
    progress.stage_end({"slices": len(slices), "labelled": int(slices.labelled.sum()), **counts})
    return slices


def _class_locations(case) -> dict:
    """``{class name: [x, y, radius]}``: where each class's labelled voxels lie in the patient's
    cross-section, LPS mm from the scan's centre, and their RMS distance from their centre
    (:func:`TSKDLib.deploy.inference.class_locations_lps`); {} for a 2D image or a scan without labels."""
    from TSKDLib.deploy.inference import class_locations_lps

    labels, idx = case.label_slices(), case.labelled_indices()
    if labels is None or not idx or case.image.GetDimension() != 3:
        return {}
    names = case.class_map.names
    found = class_locations_lps(labels, case.frame.frame_geometry(case.image), range(1, len(names) + 1), idx)
    return {names[k - 1]: [round(v, 2) for v in xyr] for k, xyr in found.items()}


def _training_factors(info: dict, names: Sequence[str], setting: bool | None) -> list[float]:
    """One intensity factor per scan of ``cases.json`` (``info``), in its order (the slice set's
    ``case_index``): :func:`TSKDLib.deploy.inference.training_intensity_factors` of the scans'
    ``class_intensity_medians``; all 1.0 when ``setting`` (``DistillConfig.standardize``) is False
    or fewer than two scans record class intensities (CT, 2D images, one scan)."""
    from TSKDLib.deploy.inference import training_intensity_factors

    per_scan = [c.get("class_intensity_medians") or {} for c in info.get("cases", [])]
    if setting is False:
        return [1.0] * len(per_scan)
    return training_intensity_factors(per_scan, names)


def _card_normalization(info: dict, factors: Sequence[float] | None = None) -> dict:
    """The model card's ``normalization`` entry: the run's :class:`TSKDLib.data.preprocess.Normalization`
    and, when the training scans recorded class intensities (``cases.json``'s
    ``class_intensity_medians``), ``standardize``: one ``{class name: median}`` per training
    scan (``class_medians``; ``scans``: their image files) for
    :attr:`TSKDLib.deploy.inference.ModelPackage.intensity_reference`. ``factors``: the
    distillation's ``intensity_factors`` (one per scan of ``info``, :func:`_training_factors`):
    the medians recorded are then those of the standardised scans the student learnt from
    (:func:`TSKDLib.deploy.inference.standardized_medians`), and the factors are kept as
    ``training_factors``."""
    from TSKDLib.deploy.inference import INTENSITY_TOLERANCE, standardized_medians

    norm = dict(info["normalization"])
    all_cases = info.get("cases", [])
    if factors is None or len(factors) != len(all_cases):
        factors = [1.0] * len(all_cases)
    pairs = [(c, float(f)) for c, f in zip(all_cases, factors) if c.get("class_intensity_medians")]
    if pairs:
        cases, kept = [c for c, _ in pairs], [f for _, f in pairs]
        norm["standardize"] = {
            "class_medians": standardized_medians([c["class_intensity_medians"] for c in cases], kept),
            "scans": [str(Path(c["image"]).resolve()) if c.get("image") else str(c.get("name")) for c in cases],
            "training_factors": [round(f, 4) for f in kept],
            "tolerance": INTENSITY_TOLERANCE,
            "note": "median normalised intensity of each class's labelled voxels, per training scan: "
                    "tskd segment scales a scan whose classes come out darker or brighter than these "
                    "(geometric mean over the scans) by more than the tolerance, and segments it again"}
    return norm


def _normalization_for(cases, name: str):
    """The one intensity normalisation of the run (:class:`TSKDLib.data.preprocess.Normalization`):
    the named preset, or (``auto``) the one each scan's modality/intensities call for
    (:meth:`Normalization.for_modality`), which must then be the same for every scan: the model
    package applies one normalisation to new scans. Raises :class:`ConfigError` otherwise."""
    from TSKDLib.data.preprocess import Normalization

    if name != "auto":
        return Normalization.preset(name)
    chosen = [Normalization.for_modality(c.modality, c.image_slices()) for c in cases]
    if any(n != chosen[0] for n in chosen):
        kinds = ", ".join(f"{c.name}: {n.kind}" for c, n in zip(cases, chosen))
        raise ConfigError(f"the scans call for different intensity normalisations ({kinds}).",
                          fix="train on scans of one modality, or set data.normalization in a --config file.")
    return chosen[0]


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


def _acquisition_of(info: dict) -> dict:
    """The training scans' acquisition planes and slice normals (``cases.json`` content)."""
    cases = info["cases"]
    return {"planes": [c.get("acquisition_plane") for c in cases if c.get("slice_normal")],
            "directions": [c["slice_normal"] for c in cases if c.get("slice_normal")]}


def _model_metadata(cfg: PipelineConfig, run: RunDir, prepared: _Prepared, teacher_meta: dict, summary: dict) -> dict:
    """Model-card entries: name, training summary, validation, teacher (from the stages' outputs
    already read: ``prepared.info`` = ``cases.json``, ``teacher_meta`` = ``teacher.json``)."""
    info, state = prepared.info, run.state()["stages"]
    names = prepared.slices.class_map.names
    val = _teacher_val_per_class(teacher_meta)
    val = dict(zip(names, val)) if val else None
    dice = {}
    if isinstance(summary.get("labelled_dice"), (list, tuple)):
        dice = dict(zip(names, summary["labelled_dice"]))
    gate = summary.get("quality_gate")
    return {"name": run.path.name,
            "training": {"scans": [c["image"] for c in info["cases"]],
                         "run_dir": str(run.path.resolve()),  # for `tskd update` (teacher outputs)
                         "labelled_slices": {c["name"]: c["labelled_slices"] for c in info["cases"]},
                         "labelled_slices_per_class": info["labelled_slices_per_class"],
                         "preset": cfg.preset, "synthesis": cfg.synthesis_enabled, "seed": cfg.seed,
                         "stage_seconds": {k: v.get("seconds") for k, v in state.items()},
                         "distillation": summary},
            "validation": {"dice": dice, "teacher_val_dice": state.get("teacher", {}).get("val_dice"),
                           "teacher_val_dice_per_class": val, "quality_gate": gate,
                           "warnings": (gate or {}).get("warnings", []),
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
            device: str | None = None, largest_component: bool = False, axis: str | None = None,
            all_components: bool = False) -> list[dict]:
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
        3D clean-up per class: remove islands under 50 mm^3, fill enclosed holes, and remove the
        components under a fifth of the largest one of the model's one-object classes (the card's
        ``postprocessing.one_object``; ``all_components`` keeps every component;
        ``largest_component`` keeps only the largest one of every class).
    device:
        ``cpu`` forces the CPU provider; ``auto``/``cuda`` use CUDA when onnxruntime has it.
    axis:
        Optional: the slice axis the caller expects; the model's own (``slice_axis`` in its card)
        is always used, and a different one is a :class:`ConfigError`. Scans acquired in another
        plane than an ``acquisition`` model's training scans are refused
        (:func:`TSKDLib.deploy.inference.check_acquisition_plane`, :class:`InputError`).

    Returns
    -------
    list of ``{"input", "output", "seconds", "timings", "check_slices", "corrected_slices",
    "intensity_factor"}``; ``intensity_factor``: the factor the scan's normalised intensities were
    scaled by to match the training scans' classes (1.0: none;
    :func:`TSKDLib.deploy.inference.standardized_range`);
    ``check_slices``: the file's own slice indices (along the model's slice axis, as ``tskd update
    --slices`` takes them) of the three slices most likely to need a correction, most likely first
    (:class:`TSKDLib.deploy.inference.SliceReview`), never one of ``corrected_slices``: the slices
    of this same file that the model's quick updates were given as corrected
    (:func:`TSKDLib.distillation.update.corrected_slices`; empty for a model never updated on it).
    """
    from TSKDLib.deploy.inference import Cleanup, load_model_package, segment_file
    from TSKDLib.distillation.update import corrected_slices

    progress = progress or NullProgress()
    providers = ["CPUExecutionProvider"] if device == "cpu" else None
    pkg = load_model_package(resolve_model_dir(model_dir), providers=providers)
    if axis and axis != pkg.slice_axis:
        raise ConfigError(f"the model was trained on {pkg.slice_axis} slices, not {axis}.", pkg.path,
                          f"Drop --axis or pass --axis {pkg.slice_axis}; to slice along {axis}, train a model with it.")
    out = Path(out)
    single_file = len(images) == 1 and out.name.lower().endswith(OUTPUT_SUFFIXES)
    fmt = (fmt or "seg.nrrd").lstrip(".")
    clean = Cleanup.for_package(pkg, all_components, largest_component) if cleanup else None
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
        review: dict = {}
        segment_file(pkg, image, target, overwrite=overwrite, cleanup=clean, timings=timings, review=review)
        dt = time.monotonic() - t0
        corrected = corrected_slices(pkg.card, image)
        check = review["slices"].worst(3, exclude=corrected)
        factor = round(float(review.get("intensity_factor", 1.0)), 4)
        results.append({"input": str(image), "output": str(target), "seconds": dt, "timings": timings,
                         "check_slices": check, "corrected_slices": corrected, "intensity_factor": factor})
        progress.update(i + 1, metrics={"seconds": round(dt, 3), "check_slices": check,
                                        "corrected_slices": corrected, "intensity_factor": factor},
                        message=str(target))
    progress.stage_end({"scans": len(images)})
    return results


def copy_model_package(src: str | Path, dest: str | Path, overwrite: bool = False) -> Path:
    """Verify a model package (checksums, ONNX loads) and copy it atomically to ``dest``."""
    from TSKDLib.deploy.inference import load_model_package

    src, dest = resolve_model_dir(src), Path(dest)
    load_model_package(src)
    if dest.exists() and not overwrite:
        raise RunExistsError("destination exists.", dest, "Choose a new folder or pass --overwrite.")
    with atomic_dir(dest, create=False) as tmp:  # full disk / permission / read-only: dest unchanged
        shutil.copytree(src, tmp)
    return dest
