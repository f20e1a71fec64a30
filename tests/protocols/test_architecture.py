"""Structural rules of `protocols`: sans-IO imports, layering, public names and their docs."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import protocols

PACKAGE = Path(protocols.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))

FORBIDDEN = {
    "socket",
    "ssl",
    "asyncio",
    "threading",
    "multiprocessing",
    "subprocess",
    "time",
    "random",
    "pickle",
    "torch",
    "flwr",
    "secure_fedllm",
    "threat_models",
}


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by a file, with the relative level (0 for absolute)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
            if node.level == 0 and node.module:
                out += [(f"{node.module}.{alias.name}", 0) for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            out += [(arg.value, 0) for arg in node.args[:1] if isinstance(arg, ast.Constant)]
    return out


def test_sources_found() -> None:
    assert len(SOURCES) >= 15
    assert PACKAGE / "secagg" / "_client.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_io_clock_thread_or_framework_imports(path: Path) -> None:
    for module, level in imported_modules(path):
        if level == 0:
            top = module.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {module}"
        assert "importlib" not in module, f"{path.name} imports dynamically"


def _resolve(path: Path, module: str, level: int) -> str:
    if level == 0:
        return module
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


@pytest.mark.parametrize("path", sorted((PACKAGE / "primitives").glob("*.py")), ids=lambda p: p.name)
def test_primitives_do_not_depend_on_the_protocols(path: Path) -> None:
    for module, level in imported_modules(path):
        target = _resolve(path, module, level)
        assert not target.startswith("protocols.secagg"), f"{path.name} imports {target}"
        assert target not in ("protocols.driver", "protocols.plaintext", "protocols.encoding")


def test_resolve_relative_imports() -> None:
    client = PACKAGE / "secagg" / "_client.py"
    assert _resolve(client, "primitives.aead", 2) == "protocols.primitives.aead"
    assert _resolve(client, "_graph", 1) == "protocols.secagg._graph"


def test_import_protocols_loads_no_framework() -> None:
    # (numpy and pydantic import pickle themselves; the AST test above keeps protocols from doing so)
    code = (
        "import sys, protocols, protocols.secagg, protocols.primitives\n"
        "bad = [m for m in ('torch', 'secure_fedllm', 'threat_models', 'flwr', 'transformers') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    root = PACKAGE.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "", f"importing protocols loaded {done.stdout.strip()}"


# -- public names --------------------------------------------------------------------------------------------


PUBLIC_MODULES = ["protocols", "protocols.secagg", "protocols.primitives"]


def isort_key(name: str) -> tuple[int, list[object]]:
    """RUF022's isort-style order: SCREAMING_CASE, then CamelCase, then the rest; natural sort within."""
    if name.isupper() or (name.upper() == name and any(c.isalpha() for c in name)):
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return group, natural


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_names_exist_are_documented_and_sorted(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = module.__all__
    assert len(names) == len(set(names))
    assert names == sorted(names, key=isort_key), f"{module_name}.__all__ is not isort-sorted"
    for name in names:
        assert hasattr(module, name), f"{module_name}.{name} is missing"
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"
    assert inspect.getdoc(module)


def test_every_module_all_is_sorted_and_exists() -> None:
    for path in SOURCES:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(name)
        assert module.__doc__, f"{name} has no module docstring"
        names = getattr(module, "__all__", None)
        if names is None:
            continue
        assert names == sorted(names, key=isort_key), f"{name}.__all__ is not isort-sorted"
        for item in names:
            assert hasattr(module, item), f"{name}.{item} is missing"


def test_secagg_and_primitives_are_reexported_consistently() -> None:
    import protocols.secagg as secagg

    for name in protocols.__all__:
        if hasattr(secagg, name):
            assert getattr(protocols, name) is getattr(secagg, name)


def test_the_checks_themselves(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("import time\nfrom socket import socket\nfrom ..secagg import x\nimport os.path\n")
    found = imported_modules(source)
    assert ("time", 0) in found and ("socket", 0) in found and ("secagg", 2) in found
    names = ["run_round", "STAGE_OF", "AbortError", "ETA", "x25519_agree", "ed25519_sign", "DecodedSum", "DecodeError"]
    assert sorted(names, key=isort_key) == [
        "ETA",
        "STAGE_OF",
        "AbortError",
        "DecodeError",
        "DecodedSum",
        "ed25519_sign",
        "run_round",
        "x25519_agree",
    ]


def test_driver_depends_on_the_session_interface_only() -> None:
    """The driver imports public packages only (no `_private` module of any protocol family)."""
    driver = PACKAGE / "driver.py"
    private = [
        m
        for m, _ in imported_modules(driver)
        if not m.startswith("__future__") and any(part.startswith("_") for part in m.split("."))
    ]
    assert private == []
    # control: the checker does see a private import
    assert any(p.startswith("_") for m, _ in imported_modules(PACKAGE / "secagg" / "__init__.py") for p in m.split("."))
