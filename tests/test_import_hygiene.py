"""Our top-level folders never shadow installed packages of the same name (issue 23).

``passes/`` and ``kernels/`` install as ``otofx.passes`` and ``otofx.kernels``. Hugging Face's
``kernels`` package, which transformers imports when present, has the same bare name as our
folder; a test run from the repository root must still get theirs.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("kernels", "passes")


def _origin(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    where = spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations or []), None)
    return None if where is None else Path(where).resolve()


@pytest.mark.parametrize("name", OURS)
def test_bare_name_is_not_our_folder(name):
    origin = _origin(name)
    assert origin is None or not origin.is_relative_to(ROOT / name), (
        f"`import {name}` resolves to {origin}, our folder; sys.path[:3] = {sys.path[:3]}")


def test_transformers_kernels_integration_imports():
    """What transformers does when Hugging Face's `kernels` is installed: import its names."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` package is not installed")
    import kernels

    assert hasattr(kernels, "use_kernel_forward_from_hub"), kernels.__file__
    from transformers.integrations import hub_kernels

    assert hub_kernels is not None


def test_python_m_pytest_from_root_is_shielded():
    """`python -m pytest` from the root (the root first on sys.path) still resolves bare names outside."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{Path(__file__).relative_to(ROOT)}::test_bare_name_is_not_our_folder"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_no_bare_imports_of_our_folders():
    """Library, tests and benches import otofx.passes / otofx.kernels, never `passes` / `kernels`."""
    bad = []
    for path in ROOT.glob("**/*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or "site-packages" in rel.parts:
            continue
        tree = ast.parse(path.read_text(), str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            # NB: this file imports Hugging Face's `kernels` on purpose (after checking where it is)
            bad += [f"{rel}:{node.lineno}: {n}" for n in names
                    if n.split(".")[0] in OURS and path != Path(__file__).resolve()]
    assert not bad, bad


def test_methods_are_attributes_of_otofx_loaded_on_first_use():
    """`import otofx` then `otofx.admm.ADMM` (and the other seed methods) works without importing each
    subpackage first, and `import otofx` does not load them up front."""
    code = ("import sys, otofx\n"
            "names = ('admm', 'scop', 'slb', 'jointrd')\n"
            "assert not any(f'otofx.{n}' in sys.modules for n in names), [n for n in names if f'otofx.{n}' in sys.modules]\n"
            "assert otofx.admm.ADMM and otofx.scop and otofx.slb and otofx.jointrd\n"
            "assert set(names) <= set(dir(otofx))\n"
            "try:\n    otofx.no_such_thing\nexcept AttributeError as e:\n    assert 'no_such_thing' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
