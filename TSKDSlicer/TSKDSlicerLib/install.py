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
from dataclasses import dataclass

#: The backend uses ``torch.amp.GradScaler`` (torch 2.3) and ``pyproject.toml`` asks for torch>=2.3.
MIN_TORCH = ">=2.3"
MIN_TORCHVISION = ">=0.18"
#: What each mode installs (the README's table says the same; a test checks both).
MODES = ("segment", "train")


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


def installed_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (no import), None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_satisfies(version: str | None, spec: str) -> bool:
    """``version_satisfies("2.1.0+cu121", ">=2.3") -> False``; None (not installed) -> False."""
    if not version:
        return False
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
        return Version(version) in SpecifierSet(spec)
    except ImportError:  # pragma: no cover - compare the numeric release only
        want = tuple(int(x) for x in re.findall(r"\d+", spec.lstrip("<>=!~"))[:3])
        have = tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])
        return have >= want


def torch_problem(version: str | None) -> str | None:
    """Why a torch of ``version`` cannot run TSKD training, or None when it can."""
    if version is None:
        return "PyTorch is not installed."
    if not version_satisfies(version, MIN_TORCH):
        return (f"PyTorch {version} is too old: TSKD training needs torch{MIN_TORCH} "
                f"(torch.amp.GradScaler).")
    return None


@dataclass
class InstallPlan:
    """What one mode needs: ``torch`` (through PyTorchUtils, torch``MIN_TORCH``), the requirement
    strings pip is asked for (only the missing ones), and the constraints pinning packages that
    are already installed (Slicer's numpy/SimpleITK/requests and the torch/torchvision build
    PyTorchUtils chose, so no dependency can replace the CUDA build)."""

    mode: str
    torch: bool
    torch_reason: str | None
    requirements: list
    constraints: list

    def pip_args(self, constraints_file: str | None = None) -> list:
        """``["install", req..., "-c", file]`` for ``python -m pip`` (empty when nothing is missing)."""
        if not self.requirements:
            return []
        args = ["install", *self.requirements]
        if constraints_file:
            args += ["-c", constraints_file]
        return args


def requirements_file(mode: str, resources_dir: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return os.path.join(resources_dir, "requirements.txt" if mode == "train" else "requirements-segment.txt")


def pinned_constraints(names_file: str) -> list[str]:
    """``["numpy==2.4.6", "torch==2.5.1+cu124", ...]`` for the installed packages named in ``names_file``."""
    out = []
    for name in read_requirement_lines(names_file):
        version = installed_version(requirement_name(name))
        if version:
            out.append(f"{requirement_name(name)}=={version}")
    return out


def install_plan(mode: str, resources_dir: str) -> InstallPlan:
    """What to install for ``mode`` (``"segment"``: ONNX Runtime and friends, never torch;
    ``"train"``: torch through PyTorchUtils, then the training requirements)."""
    req = requirements_file(mode, resources_dir)
    needs_torch = mode == "train"
    reason = torch_problem(installed_version("torch")) if needs_torch else None
    return InstallPlan(mode=mode, torch=bool(needs_torch and reason), torch_reason=reason,
                       requirements=missing_requirements(req),
                       constraints=pinned_constraints(os.path.join(resources_dir, "constraints.txt")))


# ---------------------------------------------------------------------------------------------
# Slicer-only
# ---------------------------------------------------------------------------------------------

def ensure_torch(ask: bool = True) -> None:
    """Make sure a PyTorch ``MIN_TORCH`` is installed, through the PyTorch extension if needed.

    Checked from the installed metadata (torch is not imported). An older torch is upgraded
    through PyTorchUtils (same CUDA selection); Slicer must then restart. Raises
    :class:`InstallError` when the extension is missing or the user declines; with
    ``restart_required`` when Slicer must restart first.
    """
    import sys

    problem = torch_problem(installed_version("torch"))
    if problem is None:
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise InstallError(problem + " Install the 'PyTorch' extension from the Extensions Manager, "
                           "restart Slicer, and try again.", restart_required=True) from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    was_imported = "torch" in sys.modules
    torch = logic.installTorch(askConfirmation=ask, torchVersionRequirement=MIN_TORCH,
                               torchvisionVersionRequirement=MIN_TORCHVISION)
    if torch is None:
        raise InstallError(problem + " PyTorch was not installed (declined or failed). See the Python console.")
    if was_imported or torch_problem(installed_version("torch")):
        raise InstallError(f"PyTorch {installed_version('torch')} was installed. Restart Slicer to use it.",
                           restart_required=True)


def ensure_requirements(requirements_path: str, constraint_names_path: str | None = None,
                        requester: str = "TSKD", run_pip=None) -> None:
    """Install what ``requirements_path`` lists and is missing (confirmation, progress, Cancel).

    Uses ``slicer.packaging.pip_ensure`` where it exists (Slicer >= 5.12: its own progress dialog,
    and it offers a restart when an already-imported package changed). Otherwise asks for
    confirmation and calls ``run_pip(args)`` with the ``python -m pip`` arguments; the module
    passes a runner that shows a progress dialog with Cancel and keeps the GUI responsive
    (``slicer.util.pip_install`` blocks the GUI for minutes). ``run_pip`` returns False when
    cancelled. Raises :class:`InstallError` if the user declines or cancels, or pip fails.
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
        if not slicer.util.confirmOkCancelDisplay(
                f"{requester} needs these Python packages:\n\n" + "\n".join(missing) +
                "\n\nInstall them now? This can take several minutes.", requester):
            raise InstallError("Installation of the Python packages was declined.")
        args = ["install", *missing] + (["-c", constraints] if constraints else [])
        if run_pip is None:
            with slicer.util.WaitCursor():
                slicer.util.pip_install(args[1:])
        elif run_pip(args) is False:
            raise InstallError("Installation of the Python packages was cancelled.")
    finally:
        if constraints and os.path.exists(constraints):
            os.remove(constraints)
    still = missing_requirements(requirements_path)
    if still:
        raise InstallError("Packages were installed but still do not import: " + ", ".join(still) +
                           ". Restart Slicer and try again.", restart_required=True)
