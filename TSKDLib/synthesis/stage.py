"""The synthesis stage: train a diffusion model on the user's slices, generate, label with the
teacher, filter, store (resumable).

Folder layout of ``out_dir``::

    config.json                  effective SynthesisConfig of the last run
    train-<key>/checkpoint.pt    training checkpoint (atomic, every config.checkpoint_every steps)
    train-<key>/model/           final EMA model (diffusers save_pretrained + tskd_diffusion.json)
    samples-<key>/part-*.pt      generated + teacher-labelled slices, written batch by batch
    transfer/                    the filtered SyntheticTransferSet (npy arrays + manifest.json)
    grid.png                     real vs synthetic slices with teacher contours

``<key>`` hashes the settings (and, for training, the data) that determine the result, so a rerun
with the same settings resumes and a changed setting starts a fresh folder next to the old one.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from TSKDLib.data.case import SliceSet
from TSKDLib.errors import ConfigError
from TSKDLib.data.io import atomic_write
from TSKDLib.pipeline.progress import NullProgress, ProgressReporter
from TSKDLib.engine.runtime import resolve_device
from TSKDLib.synthesis.config import SynthesisConfig
from TSKDLib.engine.loop import cpu_threads
from TSKDLib.synthesis.diffusion import (DiffusionModel, labels_to_resolution, make_condition, random_affine,
                        train_diffusion, warp_labels)
from TSKDLib.synthesis.report import dice_per_slice, intensity_histogram_distance, save_grid
from TSKDLib.synthesis.transfer import SyntheticTransferSet, TeacherProba, label_images

SEED_STRIDE = 1_000_003
MAX_REAL_FOR_STATS = 64


def sample_seed(seed: int, index: int) -> int:
    """Seed of synthetic image ``index`` (independent of batch size and of resumption)."""
    return seed * SEED_STRIDE + index


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-1 (first 12 hex digits) of the training tensors, so changed data retrains."""
    h = hashlib.sha1()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.float().contiguous().numpy().tobytes())
    h.update(labels.long().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def condition_pool(slices: SliceSet, resolution: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Real label maps to condition on: the labelled slices holding a structure (all labelled
    slices if none does). Returns ``(P, R, R)`` int64 and ``[(case_index, slice_index)]``."""
    lab = slices.labelled
    has_fg = (slices.labels > 0).flatten(1).any(1) & lab
    sel = has_fg if has_fg.any() else lab
    idx = torch.nonzero(sel).flatten()
    maps = labels_to_resolution(slices.labels[idx], resolution)
    src = [(int(slices.case_index[i]), int(slices.slice_index[i])) for i in idx]
    return maps, src


def generate(model: DiffusionModel, indices: list[int], config: SynthesisConfig, size: int,
             pool: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], list[int | None], torch.Tensor | None]:
    """Generate synthetic slices ``indices`` (each from its own seed, :func:`sample_seed`).

    Returns ``(images (n, 1, size, size) float32 in [0, 1], seeds, condition pool index per image
    (None = unconditional), condition label maps (n, size, size) int64 or None)``. In ``mask`` mode
    each image is conditioned on a random real label map from ``pool`` (``(P, R, R)``), randomly
    shifted/rotated/scaled when ``config.mask_augment``."""
    R = model.resolution
    noises, seeds, srcs, maps = [], [], [], []
    for i in indices:
        s = sample_seed(config.seed, i)
        g = torch.Generator().manual_seed(s)
        noises.append(torch.randn(1, 1, R, R, generator=g))
        seeds.append(s)
        if model.cond_channels and pool is not None and len(pool):
            j = int(torch.randint(0, len(pool), (1,), generator=g))
            m = pool[j:j + 1]
            if config.mask_augment:
                m = warp_labels(m, random_affine(1, g))
            maps.append(m)
            srcs.append(j)
        else:
            srcs.append(None)
    noise = torch.cat(noises)
    cond, cmaps = None, None
    if maps:
        cmaps = torch.cat(maps)
        cond = make_condition(cmaps, model.num_classes)
    with cpu_threads(config.threads):
        x = model.sample(noise, cond, steps=config.sample_steps, sampler=config.sampler,
                         guidance_scale=config.guidance_scale, mixed_precision=config.mixed_precision)
    if size != R:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        if cmaps is not None:
            cmaps = F.interpolate(cmaps[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return x.contiguous(), seeds, srcs, cmaps


def _load_parts(folder: Path) -> dict[int, dict]:
    items: dict[int, dict] = {}
    for f in sorted(folder.glob("part-*.pt")):
        try:
            part = torch.load(f, map_location="cpu", weights_only=False)
        except Exception:  # a torn file cannot exist (atomic rename), but be forgiving
            f.unlink(missing_ok=True)
            continue
        for j, idx in enumerate(part["indices"]):
            items[int(idx)] = {k: (v[j] if isinstance(v, (torch.Tensor, list)) else v)
                               for k, v in part.items() if k != "indices"}
    return items


def run_synthesis(slices: SliceSet, teacher_proba: TeacherProba, out_dir: str | Path,
                  config: SynthesisConfig | None = None,
                  progress: ProgressReporter | None = None) -> SyntheticTransferSet:
    """TS-KD stage 2 (Liang et al., arXiv 2503.06976): diffusion-generated, teacher-labelled
    synthetic slices for the distillation transfer set. Resumes from ``out_dir``.

    Parameters
    ----------
    slices:
        All real slices (labelled and unlabelled) from :func:`TSKDLib.data.case.prepare_slices`:
        ``images (N, 1, S, S)`` float32 in [0, 1], ``labels (N, S, S)`` (-1 = unlabelled). The
        diffusion model trains on every slice; ``mask`` conditioning uses the labelled ones.
    teacher_proba:
        The fine-tuned teacher as a callable ``(B, 1, S, S) float32 in [0, 1] -> (B, K+1, S, S)``
        probabilities (e.g. ``lambda x: class_probabilities(teacher(x).logits)``).
    out_dir:
        Stage folder (see the module docstring). Training checkpoints and generated parts found
        there are reused, so a killed run resumes; an up-to-date ``transfer/`` is returned as is.
    config:
        :class:`SynthesisConfig` (default: the ``fast`` preset).
    progress:
        Reporter; emits ``stage_start('synthesis', steps + num_images)``, one ``progress``
        per training step (``loss``) and per generated batch, logs, and ``stage_end`` with the
        metrics below.

    Returns
    -------
    The filtered :class:`SyntheticTransferSet` (also saved in ``out_dir/transfer``). Its
    ``manifest["metrics"]``: ``train_seconds``, ``final_loss`` (mean of the last 10 % of steps),
    ``sample_seconds_per_image``, ``label_seconds_per_image``, ``generated``, ``kept``,
    ``dropped``, ``min_confidence`` (the effective threshold), ``max_entropy``, ``mean_confidence_synthetic`` (all
    generated), ``mean_confidence_kept``, ``mean_confidence_real``, ``histogram_tv``,
    ``histogram_w1`` (kept synthetic vs real), ``condition_dice`` (teacher vs conditioning mask,
    ``mask`` mode).

    Raises
    ------
    ConfigError
        Invalid settings, no slices, or a teacher output of the wrong shape.
    CheckpointError
        An unreadable training checkpoint.
    """
    config = config or SynthesisConfig.preset("fast")
    config.validate()
    progress = progress or NullProgress()
    if len(slices) == 0:
        raise ConfigError("no slice to synthesise from.")
    with cpu_threads(config.threads):
        return _run(slices, teacher_proba, out_dir, config, progress)


def _run(slices, teacher_proba, out_dir, config, progress) -> SyntheticTransferSet:
    return _SynthesisRun(slices, teacher_proba, Path(out_dir), config, progress).run()


class _SynthesisRun:
    """One :func:`run_synthesis` call: reuse, train (or resume), generate, filter, store."""

    def __init__(self, slices, teacher_proba, out_dir: Path, config: SynthesisConfig, progress):
        self.slices, self.teacher_proba, self.out_dir = slices, teacher_proba, out_dir
        self.config, self.progress = config, progress
        self.K, self.S = slices.class_map.num_classes, slices.size
        self.tkey = config.train_key(data_fingerprint(slices.images, slices.labels))
        self.skey = config.sample_key(self.tkey, self.S)
        self.filt = {"min_confidence": config.min_confidence, "max_entropy": config.max_entropy,
                     "real_confidence_quantile": config.real_confidence_quantile}
        self.transfer_dir = out_dir / "transfer"

    def run(self) -> SyntheticTransferSet:
        config, out_dir = self.config, self.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        self.progress.stage_start("synthesis", config.steps + config.num_images)
        done = self._reusable()
        if done is not None:
            return done
        model, info = self._train()
        items, t_sample, t_label, n_new = self._generate(model)
        return self._filter_and_store(items, info, t_sample, t_label, n_new)

    def _reusable(self) -> SyntheticTransferSet | None:
        """An up-to-date ``transfer/`` (same samples and filter), or None."""
        if not (self.transfer_dir / "manifest.json").exists():
            return None
        try:
            done = SyntheticTransferSet.load(self.transfer_dir)
        except Exception:
            return None
        m = done.manifest
        old = m.get("filter", {})
        if m.get("sample_key") == self.skey and m.get("generated_count") == self.config.num_images \
                and all(old.get(k) == v for k, v in self.filt.items()):
            self.progress.log(f"synthesis: reusing {len(done)} synthetic slices in {self.transfer_dir}")
            self.progress.stage_end(m.get("metrics", {}))
            return done
        return None

    def _train(self) -> tuple[DiffusionModel, dict]:
        """1. The trained diffusion model of ``train-<key>/`` (trained or resumed here if needed)."""
        config, progress, slices = self.config, self.progress, self.slices
        train_dir = self.out_dir / f"train-{self.tkey}"
        model_dir = train_dir / "model"
        dev = resolve_device(config.device)
        info_path = train_dir / "train.json"
        if (model_dir / "tskd_diffusion.json").exists() and info_path.exists():
            model = DiffusionModel.load(model_dir, dev)
            info = json.loads(info_path.read_text())
            progress.log(f"synthesis: diffusion model found in {model_dir}")
            progress.update(step=config.steps, metrics={"loss": info["final_loss"]}, message="trained")
            return model, info
        progress.log(f"synthesis: training a {config.resolution}x{config.resolution} diffusion model "
                     f"({config.conditioning} conditioning, {config.steps} steps) on {len(slices)} slices, {dev}")

        def on_step(step, loss):
            progress.update(step=step, metrics={"loss": loss}, message="training")

        res = train_diffusion(slices.images, slices.labels, self.K, config, train_dir, on_step)
        res.model.save(model_dir)
        tail = res.losses[-max(1, len(res.losses) // 10):] if res.losses else [float("nan")]
        prev = json.loads(info_path.read_text()) if info_path.exists() else {}
        info = {"final_loss": float(sum(tail) / len(tail)), "losses": res.losses,
                "seconds": float(prev.get("seconds", 0.0)) + res.seconds, "resumed_from": res.resumed_from}
        atomic_write(info_path, lambda tmp: tmp.write_text(json.dumps(info)), overwrite=True)
        return res.model, info

    def _generate(self, model: DiffusionModel):
        """2. Generate and label the missing synthetic slices, batch by batch (``samples-<key>/``)."""
        config, progress = self.config, self.progress
        sample_dir = self.out_dir / f"samples-{self.skey}"
        sample_dir.mkdir(exist_ok=True)
        pool, self.pool_src = (condition_pool(self.slices, config.resolution) if config.conditioning == "mask"
                               else (None, []))
        if config.conditioning == "mask" and (pool is None or len(pool) == 0):
            progress.log("synthesis: no labelled slice to condition on; generating unconditionally", "warning")
        items = _load_parts(sample_dir)
        missing = [i for i in range(config.num_images) if i not in items]
        if items:
            progress.log(f"synthesis: {config.num_images - len(missing)} synthetic slices already generated")
        t_sample = t_label = 0.0
        for b in range(0, len(missing), config.sample_batch_size):
            idx = missing[b:b + config.sample_batch_size]
            t0 = time.monotonic()
            imgs, seeds, srcs, cmaps = generate(model, idx, config, self.S, pool)
            t1 = time.monotonic()
            probs, stats = label_images(imgs, self.teacher_proba, self.K, config.label_batch_size)
            t_label += time.monotonic() - t1
            t_sample += t1 - t0
            self._store_part(sample_dir, items, idx, imgs, probs, stats, seeds, srcs, cmaps)
            n = config.num_images - len(missing) + b + len(idx)
            progress.update(step=config.steps + n, metrics={"generated": n,
                                                            "mean_confidence": float(stats["confidence"].mean())},
                            message="sampling")
        return items, t_sample, t_label, len(missing)

    def _store_part(self, sample_dir: Path, items: dict, idx, imgs, probs, stats, seeds, srcs, cmaps) -> None:
        """Write one generated batch atomically (finished slices are never regenerated)."""
        cdice = [None] * len(idx)
        if cmaps is not None:
            cdice = [float(v) for v in dice_per_slice(probs.float().argmax(1), cmaps)]
        part = {"indices": idx, "images": imgs, "probabilities": probs, "seeds": seeds,
                "confidence": stats["confidence"], "entropy": stats["entropy"],
                "foreground_fraction": stats["foreground_fraction"],
                "condition": [None if s is None else list(self.pool_src[s]) for s in srcs],
                "condition_dice": cdice}
        path = sample_dir / f"part-{idx[0]:06d}-{len(idx):04d}.pt"
        atomic_write(path, lambda tmp: torch.save(part, tmp), overwrite=True)  # finished slices are never regenerated
        for j, i in enumerate(idx):
            items[i] = {k: (v[j] if isinstance(v, (torch.Tensor, list)) else v) for k, v in part.items()
                        if k != "indices"}

    def _keep_mask(self, items: dict, order: list[int], threshold: float) -> tuple[torch.Tensor, int]:
        """Which generated slices pass confidence, entropy and the condition check; and how many
        passed the confidence/entropy part alone."""
        config = self.config
        conf_all = torch.tensor([float(items[i]["confidence"]) for i in order]) if order else torch.zeros(0)
        ent_all = torch.tensor([float(items[i]["entropy"]) for i in order]) if order else torch.zeros(0)
        keep = conf_all >= threshold
        if config.max_entropy is not None:
            keep &= ent_all <= config.max_entropy
        n_conf = int(keep.sum())
        if config.min_condition_dice is not None and config.conditioning == "mask" and order:
            cd_all = torch.tensor([float("nan") if items[i]["condition_dice"] is None
                                   else float(items[i]["condition_dice"]) for i in order])
            keep &= ~(cd_all < config.min_condition_dice)  # unconditioned (guidance-free) samples: no check
            self.filt["min_condition_dice"] = config.min_condition_dice
            self.filt["failed_condition_check"] = n_conf - int(keep.sum())
        return keep, n_conf

    def _entry(self, items: dict, i: int) -> dict:
        it = items[i]
        cond, names = it["condition"], self.slices.case_names
        return {"source": "diffusion", "sample_index": i, "seed": int(it["seeds"]),
                "confidence": round(float(it["confidence"]), 5), "entropy": round(float(it["entropy"]), 5),
                "foreground_fraction": round(float(it["foreground_fraction"]), 5),
                "condition": None if cond is None else {"case": names[cond[0]], "slice": int(cond[1])},
                "condition_dice": None if it["condition_dice"] is None else round(float(it["condition_dice"]), 4)}

    def _filter_and_store(self, items: dict, info: dict, t_sample: float, t_label: float,
                          n_new: int) -> SyntheticTransferSet:
        """3. Filter against the teacher's confidence on real slices, store ``transfer/``, report."""
        config, slices, K, S = self.config, self.slices, self.K, self.S
        # teacher on (up to 64) real slices: reference confidence, threshold and grid
        ridx = torch.linspace(0, len(slices) - 1, min(len(slices), MAX_REAL_FOR_STATS)).round().long().unique()
        real_probs, real_stats = label_images(slices.images[ridx], self.teacher_proba, K, config.label_batch_size)
        threshold = float(config.min_confidence)
        if config.real_confidence_quantile is not None:
            threshold = min(threshold, float(torch.quantile(real_stats["confidence"], config.real_confidence_quantile)))
        self.filt["effective_min_confidence"] = round(threshold, 5)
        order = list(range(config.num_images))
        keep, n_conf = self._keep_mask(items, order, threshold)
        kept = [i for i, k in zip(order, keep.tolist()) if k]
        dropped = [i for i, k in zip(order, keep.tolist()) if not k]
        if order and not kept:
            why = (f"the teacher's label of none agrees with its generating mask (Dice >= {config.min_condition_dice})"
                   if n_conf else f"the teacher is unsure about every one (confidence < {threshold:.3f})")
            self.progress.log(f"synthesis: no synthetic slice passed the check: {why}; distillation goes on with "
                              "the real slices alone. Realistic samples need a longer diffusion training "
                              "(--preset balanced or quality, a GPU).", "warning")
        empty_img = torch.zeros(0, 1, S, S)
        images = torch.stack([items[i]["images"] for i in kept]) if kept else empty_img
        probs = torch.stack([items[i]["probabilities"] for i in kept]) if kept else \
            torch.zeros(0, K + 1, S, S, dtype=torch.float16)
        conf_all = torch.tensor([float(items[i]["confidence"]) for i in order]) if order else torch.zeros(0)
        conf = conf_all[keep] if order else torch.zeros(0)
        all_imgs = torch.stack([items[i]["images"] for i in order]) if order else empty_img
        hist = intensity_histogram_distance(slices.images, images if kept else all_imgs)
        cd = [items[i]["condition_dice"] for i in order if items[i]["condition_dice"] is not None]
        tail = info["losses"][-max(1, len(info["losses"]) // 10):] if info.get("losses") else [float("nan")]
        metrics = {
            "train_seconds": round(float(info.get("seconds", 0.0)), 2),
            "final_loss": float(sum(tail) / len(tail)),
            "sample_seconds_per_image": round(t_sample / n_new, 4) if n_new else None,
            "label_seconds_per_image": round(t_label / n_new, 4) if n_new else None,
            "generated": len(order), "kept": len(kept), "dropped": len(dropped),
            "min_confidence": round(threshold, 5), "max_entropy": config.max_entropy,
            "mean_confidence_synthetic": float(conf_all.mean()) if order else None,
            "mean_confidence_kept": float(conf.mean()) if kept else None,
            "mean_confidence_real": float(real_stats["confidence"].mean()),
            "histogram_tv": hist["tv"], "histogram_w1": hist["w1"],
            "condition_dice": float(sum(cd) / len(cd)) if cd else None,
            "conditioning": config.conditioning,
        }
        manifest = {"source": "diffusion", "sample_key": self.skey, "train_key": self.tkey,
                    "generated_count": config.num_images, "class_map": slices.class_map.to_json_dict(),
                    "filter": {**self.filt, "kept": len(kept), "dropped": len(dropped)},
                    "config": config.to_dict(), "metrics": metrics,
                    "items": [{"index": n, **self._entry(items, i)} for n, i in enumerate(kept)],
                    "dropped": [self._entry(items, i) for i in dropped]}
        result = SyntheticTransferSet(images, probs, conf.float(), manifest)
        result.save(self.transfer_dir)
        self._report(items, order, keep, ridx, real_probs, real_stats, threshold, metrics)
        return result

    def _report(self, items, order, keep, ridx, real_probs, real_stats, threshold, metrics) -> None:
        """``grid.png`` (real vs synthetic, never fails the stage) and the closing log line."""
        config, slices, progress = self.config, self.slices, self.progress
        show = order[:16]
        empty_img = torch.zeros(0, 1, self.S, self.S)
        try:
            save_grid(self.out_dir / "grid.png", slices.images[ridx][:16], real_probs[:16],
                      torch.stack([items[i]["images"] for i in show]) if show else empty_img,
                      torch.stack([items[i]["probabilities"] for i in show]) if show else None,
                      colors=slices.class_map.colors,
                      titles_real=[f"real c={float(c):.2f}" for c in real_stats["confidence"][:16]],
                      titles_synthetic=[f"syn #{i} c={float(items[i]['confidence']):.2f}" for i in show],
                      dropped=[not bool(keep[i]) for i in show],
                      title=f"real (top) vs synthetic ({config.conditioning}; red = dropped, c = teacher confidence)")
        except Exception as exc:  # a figure must never fail the stage
            progress.log(f"synthesis: could not write grid.png ({exc})", "warning")
        progress.log(f"synthesis: kept {metrics['kept']}/{len(order)} synthetic slices (teacher confidence >= "
                     f"{threshold:.3f}); mean confidence real {metrics['mean_confidence_real']:.3f}, "
                     f"synthetic {metrics['mean_confidence_synthetic'] or float('nan'):.3f}")
        progress.stage_end(metrics)
