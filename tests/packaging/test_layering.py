"""The house rules of the package tree, checked on the source (ast), not by convention.

flatness.cli -> flatness -> flatness.optim -> torch: flatness.optim imports
torch, the standard library and itself only; nothing outside flatness.cli
imports the CLI, parses arguments or writes to stdout/stderr; no module
imports a top-level ``optim`` or ``cli``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import flatness

PKG = Path(flatness.__file__).resolve().parent
STDLIB = set(sys.stdlib_module_names)


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, absolute-or-relative module name) of every import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
    return out


def test_optim_imports_torch_and_the_standard_library_only():
    bad = []
    for path in _modules(PKG / "optim"):
        for level, name in _imports(path):
            root = name.split(".")[0]
            if level == 0 and root not in STDLIB and root != "torch" and not name.startswith("flatness.optim"):
                bad.append(f"{path.relative_to(PKG)}: {name}")
            if level > 1:  # from .. import: reaches outside flatness.optim
                bad.append(f"{path.relative_to(PKG)}: {'.' * level}{name}")
    assert not bad, "flatness.optim must depend on torch only:\n" + "\n".join(bad)


def test_no_top_level_optim_or_cli_imports():
    bad = [f"{p.relative_to(PKG)}: {n}" for p in _modules(PKG) for lvl, n in _imports(p)
           if lvl == 0 and n.split(".")[0] in ("optim", "cli")]
    assert not bad, "\n".join(bad)


def _library_modules() -> list[Path]:
    """Everything but flatness/cli/ and flatness/__main__.py (``python -m flatness``, the CLI's door)."""
    return [p for p in _modules(PKG) if p.relative_to(PKG).parts[0] not in ("cli", "__main__.py")]


def test_only_the_cli_imports_the_cli_or_argparse():
    bad = [f"{p.relative_to(PKG)}: {n}" for p in _library_modules() for lvl, n in _imports(p)
           if (lvl == 0 and (n == "argparse" or n.startswith("flatness.cli"))) or (lvl > 0 and n.startswith("cli"))]
    assert not bad, "library modules that parse arguments or import the CLI:\n" + "\n".join(bad)


def test_only_the_cli_prints():
    bad = []
    for path in _library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id == "print":
                bad.append(f"{path.relative_to(PKG)}:{node.lineno} print()")
            if (isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
                    and f.value.attr in ("stdout", "stderr") and isinstance(f.value.value, ast.Name) and f.value.value.id == "sys"):
                bad.append(f"{path.relative_to(PKG)}:{node.lineno} sys.{f.value.attr}.write()")
    assert not bad, "output outside flatness.cli:\n" + "\n".join(bad)
