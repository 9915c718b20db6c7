"""The packages' imports point one way: core at the bottom, the CLI on top, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Each package may import only the packages listed for it (and itself); lazy imports inside functions count.
ALLOWED = {
    "core": set(),
    "exporters": {"core"},
    "serving": {"core"},
    "loadtest": {"core"},
    "accuracy": {"core"},
    "quantize": {"core", "exporters"},
    "workflows": {"core", "exporters", "serving", "loadtest", "accuracy", "quantize"},
    "qserve": {"core", "exporters", "serving", "loadtest", "accuracy", "quantize", "workflows"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """``module path -> first-party packages it imports`` for every module of ``package``."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = (names & set(ALLOWED)) - {package}
    return found


def test_every_package_imports_only_the_layers_below_it():
    wrong = [f"{module} imports {sorted(used - ALLOWED[package])}"
             for package in ALLOWED for module, used in imports_of(package).items() if used - ALLOWED[package]]
    assert not wrong, "; ".join(wrong)


def test_the_allowed_graph_itself_has_no_cycle():
    state: dict[str, str] = {}

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert state.get(package) != "open", f"cycle: {' -> '.join(path + (package,))}"
        if state.get(package) == "done":
            return
        state[package] = "open"
        for below in ALLOWED[package]:
            visit(below, path + (package,))
        state[package] = "done"

    for package in ALLOWED:
        visit(package, ())


def test_the_checker_sees_a_lazy_import(tmp_path, monkeypatch):
    """A function-level import of a higher layer is caught (the check would be vacuous otherwise)."""
    pkg = tmp_path / "core"
    pkg.mkdir()
    (pkg / "bad.py").write_text("def f():\n    from quantize.methods import parse_recipe\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert imports_of("core") == {"core/bad.py": {"quantize"}}
