"""The library of trained students (model packages) on disk: list, rename, delete, export, import.

A model package is a directory with ``model_card.json`` (``"format": "tskd-model"``) and
``model.onnx`` (see docs/design.md). The library is one folder holding one package per
sub-folder; training runs live elsewhere (``runs/``) and their finished ``model/`` is copied in.
Plain Python: no Slicer, no Qt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CARD = "model_card.json"
BROKEN = ".tskd-broken"  # marker written into a package that failed its checksum (the reason)
FORMAT = "tskd-model"
SUPPORTED_FORMAT_VERSIONS = (1,)


class ModelLibraryError(RuntimeError):
    """A package is missing, invalid, or an operation would overwrite something."""


def read_card(model_dir: str | os.PathLike) -> dict:
    """The model card of a package; raises :class:`ModelLibraryError` if missing or invalid."""
    path = Path(model_dir) / CARD
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except FileNotFoundError:
        raise ModelLibraryError(f"{model_dir}: not a TSKD model package (no {CARD}).") from None
    except (OSError, ValueError) as exc:
        raise ModelLibraryError(f"{path}: unreadable model card ({exc}).") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModelLibraryError(f"{path}: not a TSKD model card (format must be {FORMAT!r}).")
    if card.get("format_version", 1) not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelLibraryError(f"{path}: model format version {card.get('format_version')} is not "
                                f"supported by this TSKD version; update the extension.")
    return card


def mean_dice(card: dict) -> float | None:
    """Mean validation Dice from ``card["validation"]["dice"]`` (a number or ``{class: value}``)."""
    dice = (card.get("validation") or {}).get("dice")
    if isinstance(dice, (int, float)):
        return float(dice)
    if isinstance(dice, dict):
        if isinstance(dice.get("mean"), (int, float)):
            return float(dice["mean"])
        values = [float(v) for k, v in dice.items() if isinstance(v, (int, float))]
        return sum(values) / len(values) if values else None
    return None


def dir_size(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GB"  # pragma: no cover


def safe_folder_name(name: str) -> str:
    """A folder name from a display name (ASCII letters, digits, ``-_.``; never empty)."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return text[:80] or "model"


@dataclass
class ModelInfo:
    """What the model list shows for one package."""

    path: str
    name: str
    classes: list
    dice: float | None
    created: str
    size_bytes: int
    card: dict
    broken: str | None = None

    @property
    def version(self) -> int:
        """Version number in its line of quick updates (card ``version``; 1 for a trained model)."""
        return int(self.card.get("version") or 1)

    @property
    def parent(self) -> str | None:
        """Folder name of the package this one was quick-updated from (card ``parent``), if any."""
        return self.card.get("parent") or None

    @property
    def class_names(self) -> list[str]:
        return [str(c.get("name")) for c in self.classes]

    def row(self) -> list[str]:
        """``[name, classes, Dice, date, size]`` as strings for a table."""
        name = self.name + (" (broken)" if self.broken else "")
        return [name, ", ".join(self.class_names),
                "" if self.dice is None else f"{self.dice:.3f}", self.created[:16].replace("T", " "),
                format_size(self.size_bytes)]


def model_info(model_dir: str | os.PathLike) -> ModelInfo:
    """Read a package's card and size; raises :class:`ModelLibraryError` if not a package."""
    card = read_card(model_dir)
    created = str(card.get("created") or "")
    if not created:
        created = datetime.fromtimestamp(os.path.getmtime(Path(model_dir) / CARD)).isoformat(timespec="seconds")
    return ModelInfo(path=str(model_dir), name=str(card.get("name") or Path(model_dir).name),
                     classes=list(card.get("classes") or []), dice=mean_dice(card), created=created,
                     size_bytes=dir_size(model_dir), card=card, broken=_broken_reason(model_dir))


def _broken_reason(model_dir) -> str | None:
    try:
        return (Path(model_dir) / BROKEN).read_text(encoding="utf-8").strip() or "failed its check"
    except OSError:
        return None


class ModelLibrary:
    """Model packages kept in ``root`` (one sub-folder each)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _inside(self, model_dir) -> Path:
        path = Path(model_dir).resolve()
        if path.parent != self.root.resolve():
            raise ModelLibraryError(f"{model_dir}: not a package of the model library {self.root}.")
        return path

    def list(self) -> list[ModelInfo]:
        """All valid packages, newest first; invalid folders are skipped."""
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and (child / CARD).is_file() and ".tmp-" not in child.name:
                try:
                    out.append(model_info(child))
                except ModelLibraryError:
                    continue
        return sorted(out, key=lambda m: m.created, reverse=True)

    def contains(self, model_dir) -> bool:
        """True when ``model_dir`` is a package folder of this library."""
        try:
            self._inside(model_dir)
            return True
        except ModelLibraryError:
            return False

    def mark_broken(self, model_dir, reason: str) -> None:
        """Mark a library package as broken (it failed its checksum or does not load): it is
        listed as "(broken)" and refused by the in-process segmenter until imported again."""
        path = self._inside(model_dir)
        (path / BROKEN).write_text(reason.strip() + "\n", encoding="utf-8")

    def is_broken(self, model_dir) -> bool:
        return self.contains(model_dir) and (Path(model_dir) / BROKEN).is_file()

    def broken_reason(self, model_dir) -> str | None:
        return _broken_reason(model_dir)

    def add_version(self, package_dir, parent_dir) -> ModelInfo:
        """Add a quick-updated package as a new version of library package ``parent_dir``.

        The parent is kept unchanged (restorable: select it again); the new package is named
        ``<parent name> v<N>`` with card ``version`` N (parent's + 1) and ``parent`` (the parent's
        folder name). Returns the new :class:`ModelInfo`."""
        parent = model_info(self._inside(parent_dir))
        version = parent.version + 1
        base = re.sub(r" v\d+$", "", parent.name)
        info = self.add(package_dir, name=f"{base} v{version}")
        path = Path(info.path) / CARD
        card = json.loads(path.read_text(encoding="utf-8"))
        card["version"] = version
        card["parent"] = Path(parent.path).name
        tmp = path.with_name(CARD + ".tmp")
        tmp.write_text(json.dumps(card, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return model_info(info.path)

    def versions(self, model_dir) -> list[ModelInfo]:
        """The line of versions ending at ``model_dir``, oldest first (parents that were
        deleted end the line)."""
        line = [model_info(model_dir)]
        while line[0].parent and (self.root / line[0].parent).is_dir() and len(line) < 1000:
            line.insert(0, model_info(self.root / line[0].parent))
        return line

    def unique_dir(self, name: str) -> Path:
        base = safe_folder_name(name)
        candidate, n = self.root / base, 2
        while candidate.exists():
            candidate, n = self.root / f"{base}_{n}", n + 1
        return candidate

    def add(self, package_dir: str | os.PathLike, name: str | None = None) -> ModelInfo:
        """Copy a package (a finished run's ``model/`` or an exported package) into the library.

        The copy is made in a temporary folder and renamed, so a half-copied package never
        appears. ``name`` renames it (card ``name``). Raises if the source is not a package.
        """
        card = read_card(package_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.unique_dir(name or card.get("name") or Path(package_dir).name)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.copytree(package_dir, tmp, ignore=shutil.ignore_patterns(BROKEN))
        if name:
            _write_card_name(tmp, name)
        os.replace(tmp, target)
        return model_info(target)

    import_package = add

    def rename(self, model_dir, new_name: str) -> ModelInfo:
        """Set the display name (card ``name``) and move the folder to a matching name."""
        path = self._inside(model_dir)
        if not new_name.strip():
            raise ModelLibraryError("The new name is empty.")
        _write_card_name(path, new_name.strip())
        target = path
        if safe_folder_name(new_name) != path.name:
            target = self.unique_dir(new_name)
            os.replace(path, target)
        return model_info(target)

    def delete(self, model_dir) -> None:
        """Delete a package from the library (only folders inside the library, with a card)."""
        path = self._inside(model_dir)
        read_card(path)
        shutil.rmtree(path)

    def export(self, model_dir, destination: str | os.PathLike) -> str:
        """Copy a package to ``destination`` (a new folder, or into an existing folder)."""
        read_card(model_dir)
        dest = Path(destination)
        if dest.is_dir():
            dest = dest / Path(model_dir).name
        if dest.exists():
            raise ModelLibraryError(f"{dest} already exists; choose another folder.")
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{int(time.time())}")
        shutil.copytree(model_dir, tmp)
        os.replace(tmp, dest)
        return str(dest)


def _write_card_name(model_dir: Path, name: str) -> None:
    path = Path(model_dir) / CARD
    card = json.loads(path.read_text(encoding="utf-8"))
    card["name"] = name
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=1), encoding="utf-8")
    os.replace(tmp, path)
