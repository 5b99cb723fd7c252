"""The dependency direction of DESIGN.md, checked on the source: applications → core, solvers;
solvers → (core.BlackBox at most); core → nothing of ours; no application imports another.

Every ``.py`` under core/, solvers/ and applications/ is parsed with :mod:`ast`; imports anywhere in
a file count (also inside functions), relative imports are resolved, and so are
``importlib.import_module("...")`` / ``__import__("...")`` calls with a literal name.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "solvers", "applications")
SOLVERS_MAY_USE = ("core.blackbox", "core.BlackBox")     # the query accounting, nothing else of core


def module_name(rel: Path) -> str:
    """``applications/classification/cli.py`` -> ``applications.classification.cli``."""
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``module`` imports; ``from a import b`` gives ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                  # relative: resolve against the package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, base if alias.name == "*" else f"{base}.{alias.name}")
                      for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            found.append((node.lineno, node.args[0].value))
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(sources: dict[str, str], apps: set[str]) -> list[str]:
    """Layering violations among ``{relative path: source}``; ``apps`` are the application packages."""
    found = []
    for rel, source in sorted(sources.items()):
        path = Path(rel)
        module = module_name(path)
        layer = path.parts[0]
        app = path.parts[1] if layer == "applications" and len(path.parts) > 2 else None
        for line, name in imported_names(ast.parse(source, filename=rel), module, path.name == "__init__.py"):
            where = f"{rel}:{line} imports {name}"
            if layer == "core" and (_within(name, "solvers") or _within(name, "applications")):
                found.append(f"{where}: core must not import solvers or applications")
            elif layer == "solvers" and _within(name, "applications"):
                found.append(f"{where}: solvers must not import applications")
            elif (layer == "solvers" and _within(name, "core")
                  and not any(_within(name, ok) for ok in SOLVERS_MAY_USE)):
                found.append(f"{where}: solvers may use only core.blackbox / core.BlackBox")
            elif app is not None:
                other = [a for a in apps - {app} if _within(name, f"applications.{a}")]
                if other:
                    found.append(f"{where}: application '{app}' must not import application '{other[0]}'")
    return found


def _tree() -> tuple[dict[str, str], set[str]]:
    sources = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            if "__pycache__" not in path.parts:
                sources[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    apps = {p.name for p in (ROOT / "applications").iterdir() if (p / "__init__.py").is_file()}
    return sources, apps


def test_the_code_follows_the_dependency_direction():
    sources, apps = _tree()
    assert "core/__init__.py" in sources and "classification" in apps
    assert violations(sources, apps) == []


def test_the_checker_catches_each_kind_of_violation():
    apps = {"classification", "certified_defense"}
    bad = {
        "applications/certified_defense/train.py": "from applications.classification.models import cnn\n",
        "applications/certified_defense/cli.py": "def f():\n    import applications.classification.train\n",
        "applications/certified_defense/evaluate.py": "from ..classification import models\n",
        "applications/certified_defense/plots.py": "import importlib\nimportlib.import_module('applications."
                                                   "classification.plots')\n",
        "core/runtime/thing.py": "from applications.cli import main\n",
        "core/engine/other.py": "from ...solvers import burgers\n",
        "solvers/mine.py": "from core import CGE\n",
        "solvers/yours.py": "import applications\n",
    }
    found = violations(bad, apps)
    assert len(found) == len(bad), found
    assert any("defense/evaluate.py:1 imports applications.classification.models" in f for f in found)
    assert any("application 'certified_defense' must not import application 'classification'" in f
               for f in found)
    good = {
        "applications/certified_defense/train.py": "from core.models import from_spec\n"
                                                   "from solvers import load\n"
                                                   "from applications.certified_defense import config\n"
                                                   "from . import smoothing\nfrom .config import Cfg\n",
        "applications/cli.py": "from applications.classification import cli\n",   # the dispatcher
        "core/runtime/tracking.py": "from core.runtime.errors import UserError\nfrom ..models import DnCNN\n",
        "solvers/wake.py": "from core.blackbox import BlackBox\nfrom core import BlackBox\n"
                           "from solvers import wire\n",
    }
    assert violations(good, apps) == []


@pytest.mark.parametrize("rel, level, expected", [
    ("applications/certified_defense/__init__.py", 1, "applications.certified_defense.smoothing"),
    ("applications/certified_defense/train.py", 1, "applications.certified_defense.smoothing"),
    ("applications/certified_defense/train.py", 2, "applications.smoothing"),
])
def test_relative_imports_resolve_against_the_package(rel, level, expected):
    module = module_name(Path(rel))
    tree = ast.parse(f"from {'.' * level} import smoothing")
    assert imported_names(tree, module, rel.endswith("__init__.py")) == [(1, expected)]
