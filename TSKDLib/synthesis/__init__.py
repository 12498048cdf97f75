"""Synthetic transfer set (TS-KD stage 2, Liang et al., arXiv 2503.06976).

A small diffusion model (DDPM, Ho et al. 2020; ``diffusers`` ``UNet2DModel``) is trained on the
user's own slices, nothing is downloaded; images are sampled with DDIM (Song et al. 2021) or
DPM-Solver++ (Lu et al. 2022), optionally conditioned on real label maps, upsampled to the
teacher's input size, labelled by the fine-tuned teacher (soft probabilities), filtered by the
teacher's confidence and stored for distillation.

Main entry point: :func:`run_synthesis`. Consumers: :class:`SyntheticTransferSet`
(``load(dir)``, ``to_slice_set()``, ``concat_to(real)``).
"""

from TSKDLib.synthesis.config import SynthesisConfig
from TSKDLib.synthesis.diffusion import DiffusionModel, TrainResult, make_condition, train_diffusion
from TSKDLib.synthesis.report import dice_per_slice, intensity_histogram_distance, save_grid
from TSKDLib.synthesis.stage import condition_pool, generate, run_synthesis, sample_seed
from TSKDLib.synthesis.transfer import IntensityTeacher, SyntheticTransferSet, label_images, teacher_confidence

__all__ = ["SynthesisConfig", "DiffusionModel", "TrainResult", "make_condition", "train_diffusion",
           "dice_per_slice", "intensity_histogram_distance", "save_grid", "condition_pool", "generate",
           "run_synthesis", "sample_seed", "IntensityTeacher", "SyntheticTransferSet", "label_images",
           "teacher_confidence"]
