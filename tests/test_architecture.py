"""The layout is the architecture: imports only go down the layers of docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "starlora"


def layers() -> dict[str, int]:
    """Top-level module or package name -> layer, from the table in docs/architecture.md."""
    table = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]+)\|", line)
        if row:
            for name in row.group(2).split(","):
                table[name.strip()] = int(row.group(1))
    return table


def top(module: str) -> str:
    """``starlora.scoring.engine`` -> ``scoring``."""
    return module.split(".")[1] if module.count(".") else ""


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``starlora`` import in a file, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("starlora"):
            if node.module == "starlora":  # from starlora import x
                found += [(node.lineno, f"starlora.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("starlora.")]
    return found


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
                  or p.parent != SRC)


def test_every_module_has_a_layer() -> None:
    table = layers()
    assert table, "docs/architecture.md has no layer table"
    names = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in modules()}
    assert names - {"__init__", "__main__"} == set(table)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    table = layers()
    bad = []
    for path in modules():
        own = path.relative_to(SRC).parts[0].removesuffix(".py")
        for line, module in imports(path):
            other = top(module)
            if other in table and table[other] > table[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {own} (layer {table[own]}) "
                           f"imports {module} (layer {table[other]})")
    assert not bad, "\n".join(bad)


def test_modules_stay_small() -> None:
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The import reader finds imports inside functions too (the package imports lazily)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from starlora.run.loop import run_experiment\n")
    assert imports(path) == [(2, "starlora.run.loop")] and top("starlora.run.loop") == "run"
