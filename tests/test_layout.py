"""The package layout: dependencies run one way (kernels <- dit <- runtime, codecs <- tools, compile <- app
<- bench), every import included (lazy ones too), and one implementation of each shared helper."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

BOTTOM = {"lipforcing.engine", "lipforcing.engine.errors", "lipforcing.engine.numerics", "lipforcing.engine.user_cache"}
# layer -> the layers its modules may import (besides itself and the bottom modules)
ALLOWED: dict[str, set[str]] = {
    "lipforcing.kernels": set(),
    "lipforcing.engine.dit": {"lipforcing.kernels"},
    "lipforcing.engine.runtime": {"lipforcing.kernels", "lipforcing.engine.dit"},
    "lipforcing.engine.codecs": {"lipforcing.engine.dit"},
    "lipforcing.engine.media": set(),
    "lipforcing.engine.quality": {"lipforcing.engine.media"},
    "lipforcing.compile": {"lipforcing.engine.dit", "lipforcing.engine.codecs"},
    "lipforcing.engine.tools": {"lipforcing.kernels", "lipforcing.engine.dit", "lipforcing.engine.runtime",
                                "lipforcing.engine.codecs", "lipforcing.engine.media"},
    "lipforcing.engine.app": {"lipforcing.kernels", "lipforcing.engine.dit", "lipforcing.engine.runtime",
                              "lipforcing.engine.codecs", "lipforcing.engine.media", "lipforcing.engine.tools",
                              "lipforcing.engine.quality", "lipforcing.compile"},
    "lipforcing.training": {"lipforcing.kernels", "lipforcing.engine.dit", "lipforcing.engine.runtime",
                            "lipforcing.engine.codecs", "lipforcing.engine.media", "lipforcing.engine.quality",
                            "lipforcing.engine.tools"},
    "lipforcing.bench": {"lipforcing.kernels", "lipforcing.engine.dit", "lipforcing.engine.runtime",
                         "lipforcing.engine.codecs", "lipforcing.engine.media", "lipforcing.engine.tools",
                         "lipforcing.compile", "lipforcing.engine.app", "lipforcing.engine.quality",
                         "lipforcing.training"},
}
FOLDERS = {"kernels": "lipforcing.kernels", "compile": "lipforcing.compile", "training": "lipforcing.training",
           "bench": "lipforcing.bench", "engine": "lipforcing.engine"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of every lipforcing module imported anywhere in the file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = [f"{name}.{a.name}" for a in node.names] if node.module is None else [name]
            out.update(t for t in targets if t.startswith("lipforcing"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lipforcing"))
    return out


def _layer(name: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def _package_files() -> list[Path]:
    return [p for folder in FOLDERS for p in (REPO_ROOT / folder).rglob("*.py") if not p.name.startswith("test_")]


def test_imports_run_one_way():
    problems = []
    for path in _package_files():
        module = _module_name(path)
        own = _layer(module)
        for target in _imports(path, module):
            if target in BOTTOM or target.startswith("lipforcing.engine.errors"):
                continue
            layer = _layer(target)
            if own is None:  # a bottom module: it may import other bottom modules only
                problems.append(f"{module} imports {target}")
            elif layer is not None and layer != own and layer not in ALLOWED[own]:
                problems.append(f"{module} ({own}) imports {target} ({layer})")
    assert not problems, "\n".join(problems)


def test_bottom_modules_import_no_layer():
    for name in ("errors", "numerics", "user_cache"):
        path = REPO_ROOT / "engine" / f"{name}.py"
        assert _imports(path, f"lipforcing.engine.{name}") <= {"lipforcing.engine.errors"}


def test_every_subpackage_says_what_lives_there():
    for init in [REPO_ROOT / f / "__init__.py" for f in FOLDERS] + list((REPO_ROOT / "engine").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) >= 2, f"{init} needs a docstring saying what lives there"


@pytest.mark.parametrize("helper, count", [
    ("rel_error", 1), ("parse_dtype", 1), ("random_student", 1), ("unpatchify", 1), ("rope_angles", 1),
    ("user_cache_dir", 1), ("StageTimer", 1), ("resolve_backend", 1),
    ("rel_err", 0),  # a second name for rel_error
])
def test_one_implementation_of_each_helper(helper, count):
    files = _package_files() + list((REPO_ROOT / "tests").rglob("*.py"))
    defined = [p for p in files
               for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == helper]
    assert len(defined) == count, f"{helper} is defined in {defined}"
