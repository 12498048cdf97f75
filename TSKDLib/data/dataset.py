"""Torch dataset of 2D training samples with MONAI augmentations."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from TSKDLib.data.case import SliceSet


def default_augmentation(prob: float = 0.8):
    """MONAI dictionary transforms for 2D slices at model size.

    Spatial: random rotation (+-15 deg), isotropic-ish scaling (+-15 %), translation (+-8 % of S),
    applied jointly to ``image`` (bilinear), ``label`` and ``valid`` (nearest). No flips: left and
    right organs (kidneys) must keep their side. Intensity: gamma contrast, Gaussian noise and
    smoothing, applied to the image only. Ranges follow common nnU-Net-style 2D settings
    (Isensee et al., Nat Methods 2021, supplementary "data augmentation"), narrowed for few-shot.
    """
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                                  RandGaussianSmoothd)

    return Compose([
        RandAffined(keys=("image", "label", "valid"), prob=prob, rotate_range=(0.26,),
                    scale_range=(0.15, 0.15), translate_range=(20, 20),
                    mode=("bilinear", "nearest", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        RandGaussianNoised(keys="image", prob=0.2, mean=0.0, std=0.02),
        RandGaussianSmoothd(keys="image", prob=0.1, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
    ])


class SliceDataset(Dataset):
    """2D samples from a :class:`SliceSet`.

    Each item is a dict:

    - ``image``: ``(1, S, S)`` float32 in ``[0, 1]``
    - ``label``: ``(S, S)`` int64 class indices ``0..K``; ``-1`` everywhere on unlabelled slices
    - ``valid``: ``(S, S)`` bool, False on padding
    - ``labelled``: bool scalar tensor
    - ``index``: int, position in the slice set (to look up cached teacher outputs)

    With ``augment=True`` MONAI random transforms are applied (image, label and valid jointly);
    labels of unlabelled slices stay ``-1`` everywhere. Seed the transforms through
    ``set_random_state`` or :func:`monai.utils.set_determinism` for reproducible runs.
    """

    def __init__(self, slices: SliceSet, augment: bool = False, transform=None, seed: int | None = None):
        self.slices = slices
        self.transform = (transform or default_augmentation()) if augment else None
        if self.transform is not None and seed is not None:
            self.transform.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> dict:
        s = self.slices
        labelled = bool(s.labelled[i])
        label = s.labels[i]
        item = {"image": s.images[i], "label": label, "valid": s.valid[i]}
        if self.transform is not None:
            data = {"image": item["image"],
                    "label": (label.clamp(min=0).unsqueeze(0).float()),
                    "valid": item["valid"].unsqueeze(0).float()}
            out = self.transform(data)
            item["image"] = torch.as_tensor(out["image"]).float().clamp_(0, 1)
            item["valid"] = torch.as_tensor(out["valid"])[0] > 0.5
            if labelled:
                item["label"] = torch.as_tensor(out["label"])[0].round().long()
            else:
                item["label"] = torch.full_like(label, -1)
        return {**item, "labelled": torch.tensor(labelled), "index": i}
