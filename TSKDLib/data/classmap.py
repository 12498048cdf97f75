"""Class maps: which label value in a file means which structure.

A *class map* maps label values as stored in a file (for example TotalSegmentator's 5 = liver,
HC18's 255 = fetal head) to structure names. TSKD trains on contiguous class indices
``0..K`` (0 = background); :class:`ClassMap` keeps the correspondence and the display colours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from TSKDLib.errors import LabelError

BACKGROUND_NAMES = {"background", "bg", "unlabeled", "unlabelled", "clear_label"}

# Distinct, colour-blind-friendly display colours (RGB 0..255): Okabe & Ito (2008) palette,
# then Tableau-10. Used when the labels carry no colours of their own.
_PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
            (213, 94, 0), (204, 121, 167), (31, 119, 180), (255, 127, 14), (44, 160, 44),
            (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
            (188, 189, 34), (23, 190, 207)]


def default_color(index: int) -> tuple[int, int, int]:
    """Display colour (RGB, 0..255) of foreground class ``index`` (1-based)."""
    return _PALETTE[(index - 1) % len(_PALETTE)]


@dataclass
class ClassMap:
    """Foreground classes of a task, in training order.

    Attributes
    ----------
    values:
        Label value of each foreground class in the label files, e.g. ``[5, 1, 2, 3]``.
    names:
        Structure name of each class, e.g. ``["liver", "spleen", "kidney_right", "kidney_left"]``.
    colors:
        Display colour of each class, RGB 0..255.

    Class index ``i + 1`` (training index) corresponds to ``values[i]``; index 0 is background.
    Label values present in a file but *not selected* for the task (``ignored_values``) become
    background; values that are not in the full map at all are an error (:meth:`to_indices`).
    """

    values: list[int]
    names: list[str]
    colors: list[tuple[int, int, int]] = field(default_factory=list)
    ignored_values: list[int] = field(default_factory=list)

    def __post_init__(self):
        if len(self.values) != len(self.names):
            raise LabelError("class map has a different number of label values and names.")
        if len(set(self.values)) != len(self.values):
            raise LabelError(f"class map repeats a label value: {self.values}.")
        if len(set(self.names)) != len(self.names):
            raise LabelError(f"class map repeats a class name: {self.names}.")
        if any(v <= 0 for v in self.values):
            raise LabelError("class map label values must be positive integers (0 is background).")
        if not self.colors:
            self.colors = [default_color(i + 1) for i in range(len(self.values))]
        self.colors = [tuple(int(c) for c in col) for col in self.colors]

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K."""
        return len(self.values)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, mapping: Mapping, source: str | None = None) -> "ClassMap":
        """Build from ``{value: name}`` (keys may be strings, as in JSON). Background entries
        (value 0 or a name such as "background") are dropped."""
        values, names = [], []
        for key, name in mapping.items():
            try:
                value = int(key)
            except (TypeError, ValueError):
                raise LabelError(f"class map key {key!r} is not an integer label value.", source,
                                 'Write the class map as {"1": "liver", "2": "spleen"}.') from None
            if value == 0 or str(name).strip().lower() in BACKGROUND_NAMES:
                continue
            values.append(value)
            names.append(str(name).split(" (")[0].strip())
        if not values:
            raise LabelError("class map has no foreground class.", source,
                             'Give at least one class, e.g. {"1": "liver"}.')
        order = np.argsort(values, kind="stable")
        return cls([values[i] for i in order], [names[i] for i in order])

    @classmethod
    def from_json(cls, path: str | Path) -> "ClassMap":
        """Read a JSON file ``{"value": "name", ...}``; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise LabelError("class map file not found.", path, "Check the path of the JSON class map.")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LabelError(f"class map is not valid JSON ({exc}).", path,
                             'Write it as {"1": "liver", "2": "spleen"}.') from None
        if isinstance(data, dict) and "classes" in data and isinstance(data["classes"], list):
            return cls([int(c["value"]) for c in data["classes"]], [str(c["name"]) for c in data["classes"]],
                       [tuple(c["color"]) for c in data["classes"] if "color" in c])
        if not isinstance(data, dict):
            raise LabelError("class map must be a JSON object of label value -> name.", path)
        return cls.from_dict(data, source=str(path))

    def select(self, names: Iterable[str] | None) -> "ClassMap":
        """Keep only the named classes (in the given order); other values become background.

        Raises :class:`LabelError` for a name not in the map, listing the names that are."""
        if names is None:
            return self
        names = list(names)
        missing = [n for n in names if n not in self.names]
        if missing:
            raise LabelError(f"class(es) {missing} not in the class map; it has {self.names}.",
                             fix="Pick class names from the class map.")
        idx = [self.names.index(n) for n in names]
        kept = set(idx)
        ignored = [v for i, v in enumerate(self.values) if i not in kept] + list(self.ignored_values)
        return ClassMap([self.values[i] for i in idx], names, [self.colors[i] for i in idx], ignored)

    # -- conversion ----------------------------------------------------------------------------
    def to_indices(self, label_values: np.ndarray, source: str | None = None) -> np.ndarray:
        """Map an array of file label values to class indices ``0..K`` (uint8/uint16).

        Raises :class:`LabelError` naming ``source`` if a value is in neither the selected nor the
        ignored classes."""
        present = np.unique(label_values)
        known = {0, *self.values, *self.ignored_values}
        unknown = [int(v) for v in present if int(v) not in known]
        if unknown:
            raise LabelError(
                f"label values {unknown[:10]} are not in the class map (known: {sorted(known)[:20]}).",
                source, "Add them to the class map JSON, or pass the right class map for this file.")
        lut_size = int(max(known)) + 1
        dtype = np.uint8 if self.num_classes < 255 else np.uint16
        lut = np.zeros(lut_size, dtype=dtype)
        for i, v in enumerate(self.values):
            lut[v] = i + 1
        return lut[label_values.astype(np.int64)]

    def to_values(self, indices: np.ndarray) -> np.ndarray:
        """Map class indices ``0..K`` back to file label values (uint8/uint16)."""
        lut = np.array([0, *self.values], dtype=np.uint8 if max(self.values) < 256 else np.uint16)
        return lut[indices.astype(np.int64)]

    def to_json_dict(self) -> dict:
        """Serialisable form: ``{"classes": [{"index", "value", "name", "color"}]}``."""
        return {"classes": [{"index": i + 1, "value": int(v), "name": n, "color": list(c)}
                            for i, (v, n, c) in enumerate(zip(self.values, self.names, self.colors))],
                "ignored_values": [int(v) for v in self.ignored_values]}

    @classmethod
    def from_json_dict(cls, data: Mapping) -> "ClassMap":
        classes = sorted(data["classes"], key=lambda c: c.get("index", 0))
        return cls([int(c["value"]) for c in classes], [str(c["name"]) for c in classes],
                   [tuple(c["color"]) for c in classes], [int(v) for v in data.get("ignored_values", [])])
