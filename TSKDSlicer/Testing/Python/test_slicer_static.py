"""Static checks of the Slicer extension (no Slicer needed): packaging lists, .ui names, imports.

The most common bug of scripted extensions is a file that works from source but is missing from
the packaged extension because it is not listed in CMakeLists.txt; these tests catch it.
"""

from __future__ import annotations

import ast
import compileall
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODULE = os.path.join(ROOT, "TSKDSlicer")
CMAKE = os.path.join(MODULE, "CMakeLists.txt")
UI = os.path.join(MODULE, "Resources", "UI", "TSKDSlicer.ui")
SCRIPT = os.path.join(MODULE, "TSKDSlicer.py")
NOT_PACKAGED = {"CMakeLists.txt"}


def _cmake_listed() -> set[str]:
    text = open(CMAKE, encoding="utf-8").read()
    text = re.sub(r"#.*", "", text)
    listed = set()
    for block in re.findall(r"set\((MODULE_PYTHON_SCRIPTS|MODULE_PYTHON_RESOURCES)(.*?)\)", text, re.S):
        for token in block[1].split():
            listed.add(token.replace("${MODULE_NAME}", "TSKDSlicer"))
    return listed


def _module_files() -> set[str]:
    out = set()
    for root, dirs, files in os.walk(MODULE):
        dirs[:] = [d for d in dirs if d != "__pycache__" and d != "Testing"]
        for name in files:
            if name in NOT_PACKAGED or name.endswith((".pyc", ".pyo")):
                continue
            out.add(os.path.relpath(os.path.join(root, name), MODULE).replace(os.sep, "/"))
    return out


def test_every_module_file_is_listed_in_cmake_and_exists():
    listed = _cmake_listed()
    files = _module_files()
    assert files - listed == set(), f"not listed in TSKDSlicer/CMakeLists.txt: {sorted(files - listed)}"
    missing = {f for f in listed if not os.path.exists(os.path.join(MODULE, f))}
    assert not missing, f"listed but missing: {sorted(missing)}"


def test_backend_package_is_packaged():
    text = open(CMAKE, encoding="utf-8").read()
    assert "GLOB_RECURSE TSKDLIB_PY" in text and "${TSKDLIB_SCRIPTS}" in text
    assert os.path.isfile(os.path.join(ROOT, "TSKDLib", "__main__.py"))  # python -m TSKDLib


def test_extension_metadata():
    text = open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8").read()
    assert re.search(r'EXTENSION_DEPENDS\s+"PyTorch"', text)
    assert re.search(r'EXTENSION_CATEGORY\s+"Segmentation"', text)
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert f"EXTENSION_{key}" in text
    assert "add_subdirectory(TSKDSlicer)" in text
    assert os.path.isfile(os.path.join(ROOT, "Resources", "TSKDSlicer.png"))
    module_cmake = open(CMAKE, encoding="utf-8").read()
    assert "WITH_GENERIC_TESTS" in module_cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake


def _ui_tree():
    return ET.parse(UI).getroot()


def test_ui_object_names_used_by_code_exist():
    names = {w.get("name") for w in _ui_tree().iter("widget")}
    code = open(SCRIPT, encoding="utf-8").read()
    used = set(re.findall(r"\bui\.([A-Za-z_][A-Za-z0-9_]*)", code))
    assert used, "no ui.<name> use found"
    assert used - names == set(), f".ui lacks: {sorted(used - names)}"


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse(open(SCRIPT, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TSKDSlicerParameterNode":
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError("no TSKDSlicerParameterNode")


def test_ui_parameter_bindings_match_parameter_node():
    fields = _parameter_fields()
    bound = {}
    for w in _ui_tree().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("class")
    assert set(bound) - set(fields) == set(), f"bound in .ui but not parameters: {set(bound) - set(fields)}"
    # Combo boxes need a Choice annotation (parameterNodeWrapper's QComboBox connector).
    for name, cls in bound.items():
        if cls == "QComboBox":
            assert "Choice" in fields[name], name
        if cls == "QSpinBox":
            assert fields[name].startswith("Annotated[int") or fields[name] == "int", name
    for required in ("inputVolume", "labelSegmentation", "preset", "device"):
        assert required in bound


def test_module_byte_compiles():
    assert compileall.compile_dir(MODULE, quiet=1, force=True, legacy=False,
                                  ddir="TSKDSlicer", optimize=0, workers=1)
    # No bytecode left in the tree.
    for root, dirs, _ in os.walk(MODULE):
        if "__pycache__" in dirs:
            import shutil
            shutil.rmtree(os.path.join(root, "__pycache__"), ignore_errors=True)


def test_plain_lib_imports_without_slicer_or_qt():
    """TSKDSlicerLib (all but the MRML glue) must import where Slicer and Qt are absent."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('slicer', 'qt', 'ctk', 'vtk', 'torch'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {MODULE!r})\n"
        "from TSKDSlicerLib import install, interactive, jobs, labels, launcher, models, training\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_no_heavy_imports_at_module_level():
    for path in [SCRIPT] + [os.path.join(MODULE, "TSKDSlicerLib", f)
                            for f in os.listdir(os.path.join(MODULE, "TSKDSlicerLib")) if f.endswith(".py")]:
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    assert m.split(".")[0] not in ("torch", "diffusers", "peft", "transformers", "onnxruntime",
                                                   "monai"), f"{path}: top-level import {m}"
