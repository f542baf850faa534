"""No import circle inside `hf_vasso/`: its modules form a hierarchy, read from their source with `ast`.

Every import counts, wherever it is: at module level, inside a function (a lazy import hides a circle from Python's
import machinery, not from the design), under `if TYPE_CHECKING:`; relative (`from . import x`, `from .x import y`)
and absolute (`import hf_vasso.x`, `from hf_vasso import y`, which is the package's `__init__`).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

from helpers import REPO

PACKAGE = Path(REPO) / "hf_vasso"


def module_name(file: Path) -> str:
    return "hf_vasso" if file.name == "__init__.py" else f"hf_vasso.{file.stem}"


def imported_modules(file: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that `file` imports (`from x import y`: `x.y` where that is a module, else `x`)."""
    package = "hf_vasso"  # every module of hf_vasso/ sits directly in the package
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""  # level 1: this package; the modules have no subpackages
            base = ".".join(filter(None, (base, node.module)))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.glob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def test_no_import_circle_inside_hf_vasso():
    graph = import_graph()
    assert len(graph) >= 10 and graph["hf_vasso"] >= {"hf_vasso.trainer", "hf_vasso.optimizer"}  # read, not empty
    assert "hf_vasso.state" in graph["hf_vasso.update"]  # `from . import state as state_file`
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:  # its second argument is the circle, ending where it starts
        raise AssertionError(f"import circle: {' -> '.join(reversed(error.args[1]))}") from None
