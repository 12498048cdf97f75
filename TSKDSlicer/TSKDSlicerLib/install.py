"""Python dependencies of TSKD inside Slicer: checked and installed on first use, never at import.

- PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks the CUDA build that
  matches the driver; the extension declares ``EXTENSION_DEPENDS PyTorch``.
- Everything else is in ``Resources/requirements.txt`` (training) or
  ``Resources/requirements-segment.txt`` (segmenting with an exported student: onnxruntime only),
  installed with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or, on older Slicer,
  ``slicer.util.pip_install``.
- ``Resources/constraints.txt`` names the packages Slicer ships that must stay as they are
  (numpy, SimpleITK, requests); :func:`write_pinned_constraints` pins them to the installed
  versions for pip's ``-c``.

The pure functions (requirement parsing, missing-package check, constraints) run anywhere; the
install functions need the Slicer application and import ``slicer`` lazily.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile

MIN_TORCH = ">=2.1"


class InstallError(RuntimeError):
    """Installation failed or was declined; ``restart_required`` says Slicer must restart."""

    def __init__(self, message: str, restart_required: bool = False):
        super().__init__(message)
        self.restart_required = restart_required


def read_requirement_lines(path: str) -> list[str]:
    """Requirement strings of a requirements file (comments, blanks and ``-`` options dropped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                out.append(line)
    return out


def requirement_name(req: str) -> str:
    """``"onnxruntime>=1.17; python_version>'3.9'"`` -> ``"onnxruntime"`` (normalised)."""
    name = re.split(r"[\s<>=!~;\[@(]", req.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def is_satisfied(req: str) -> bool:
    """True if ``req`` is installed in this Python at a matching version."""
    try:
        from packaging.requirements import Requirement
        r = Requirement(req)
        if r.marker is not None and not r.marker.evaluate():
            return True
        version = importlib.metadata.version(r.name)
        return not r.specifier or r.specifier.contains(version, prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False
    except ImportError:  # no `packaging`: presence only
        try:
            importlib.metadata.version(requirement_name(req))
            return True
        except importlib.metadata.PackageNotFoundError:
            return False


def missing_requirements(path: str) -> list[str]:
    """The requirements of ``path`` that are not satisfied in this Python."""
    return [r for r in read_requirement_lines(path) if not is_satisfied(r)]


def write_pinned_constraints(names_file: str, out_path: str | None = None) -> str:
    """Write a pip constraints file pinning the packages named in ``names_file`` to the versions
    installed now (``numpy==2.4.6``...), so no install can replace Slicer's own copies. Packages
    not installed are skipped. Returns the path written (a temp file by default)."""
    lines = []
    for name in read_requirement_lines(names_file):
        name = requirement_name(name)
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if out_path is None:
        fd, out_path = tempfile.mkstemp(prefix="tskd-constraints-", suffix=".txt")
        os.close(fd)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return out_path


# ---------------------------------------------------------------------------------------------
# Slicer-only
# ---------------------------------------------------------------------------------------------

def ensure_torch(ask: bool = True) -> None:
    """Make sure PyTorch is importable, installing it through the PyTorch extension if needed.

    Raises :class:`InstallError` when the extension is missing or the user declines; with
    ``restart_required`` when Slicer must restart first.
    """
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    try:
        import PyTorchUtils
    except ImportError:
        raise InstallError("PyTorch is needed for training. Install the 'PyTorch' extension from the "
                           "Extensions Manager, restart Slicer, and try again.", restart_required=True) from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        torch = logic.installTorch(askConfirmation=ask, torchVersionRequirement=MIN_TORCH)
        if torch is None:
            raise InstallError("PyTorch was not installed (declined or failed). See the Python console.")


def ensure_requirements(requirements_path: str, constraint_names_path: str | None = None,
                        requester: str = "TSKD") -> None:
    """Install what ``requirements_path`` lists and is missing (confirmation dialog, progress).

    Uses ``slicer.packaging.pip_ensure`` where it exists (it also offers a restart when an
    already-imported package changed), else ``slicer.util.pip_install`` after a confirmation.
    Raises :class:`InstallError` if the user declines or pip fails.
    """
    import slicer

    missing = missing_requirements(requirements_path)
    if not missing:
        return
    constraints = write_pinned_constraints(constraint_names_path) if constraint_names_path else None
    try:
        packaging = getattr(slicer, "packaging", None)
        if packaging is None:
            try:
                import slicer.packaging as packaging  # noqa: PLC0415
            except ImportError:
                packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            try:
                packaging.pip_ensure(missing, constraints=constraints, requester=requester)
            except RuntimeError as exc:
                raise InstallError(str(exc)) from exc
            return
        # Slicer < 5.12
        if not slicer.util.confirmOkCancelDisplay(
                f"{requester} needs these Python packages:\n\n" + "\n".join(missing) +
                "\n\nInstall them now? This can take several minutes.", requester):
            raise InstallError("Installation of the Python packages was declined.")
        args = list(missing)
        if constraints:
            args += ["-c", constraints]
        with slicer.util.WaitCursor():
            slicer.util.pip_install(args)
    finally:
        if constraints and os.path.exists(constraints):
            os.remove(constraints)
    still = missing_requirements(requirements_path)
    if still:
        raise InstallError("Packages were installed but still do not import: " + ", ".join(still) +
                           ". Restart Slicer and try again.", restart_required=True)
