"""The package reads as the run's stages: a module imports nothing from a later stage (README's layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import deepseek_ptq

PACKAGE = Path(deepseek_ptq.__file__).parent
# Shared helpers first, then the stages in the order data flows; the entry points (python -m deepseek_ptq.<tool>) last.
ORDER = ["common", "errors", "files", "model", "quant", "observe", "pipeline", "analysis", "hf", "devtools"]
SHARED = {"common", "errors", "files"}


def _stage(module: str) -> int:
    """Rank of a module path under deepseek_ptq: shared helpers 0, then each stage; entry points after all."""
    part = module.split(".")[1] if "." in module else ""
    if part in SHARED:
        return 0
    return ORDER.index(part) if part in ORDER else len(ORDER)


def _imports(path: Path) -> set[str]:
    """Every deepseek_ptq module the file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("deepseek_ptq")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepseek_ptq"):
            found |= {f"{node.module}.{a.name}" if node.module in ("deepseek_ptq", "deepseek_ptq.quant") else node.module
                      for a in node.names}
    return found


def test_no_module_imports_from_a_later_stage():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("deepseek_ptq", *path.relative_to(PACKAGE).with_suffix("").parts))
        for imported in _imports(path):
            if _stage(imported) > _stage(module) and not _same_stage(module, imported):
                violations.append(f"{module} imports {imported}")
    assert not violations, "imports from a later stage:\n" + "\n".join(violations)


def _same_stage(a: str, b: str) -> bool:
    return a.split(".")[:2] == b.split(".")[:2]


def test_every_stage_is_a_package_folder():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    entry_points = {"compare", "report", "export", "convert_hf", "bench"}
    assert top - entry_points == SHARED, f"flat modules beside the stages: {sorted(top - entry_points - SHARED)}"
    for stage in set(ORDER) - SHARED:
        assert (PACKAGE / stage / "__init__.py").exists(), stage
