"""Test configuration: environment before any import, hypothesis profiles, fixtures.

Helpers shared by the tests live in ``helpers.py`` (``tests/`` is on ``sys.path``).
"""
from __future__ import annotations

import os

# Kernel tests run the Triton kernels on the CPU interpreter; this must be set before anything
# imports otofx.kernels (and Triton reads it at import time).
os.environ.setdefault("TRITON_INTERPRET", "1")
# A rule that raises anything but RuleDeclined is a bug: the tests make it fail instead of pinning
# (passes/registry.py, strict_rules).
os.environ.setdefault("OTOFX_STRICT_RULES", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# NB: `python -m pytest` from the repository root puts the root on sys.path, and then
# `import kernels` / `import passes` find our top-level folders (installed as otofx.kernels and
# otofx.passes) instead of installed packages of those names: transformers imports Hugging
# Face's `kernels`. Drop the root before anything else is imported, and any module already
# taken from it under a bare name.
_ROOT = Path(__file__).resolve().parent.parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == _ROOT
    except OSError:
        return False


sys.path[:] = [entry for entry in sys.path if not _is_root(entry)]
for _name in ("kernels", "passes"):
    _mod = sys.modules.get(_name)
    if _mod is not None and Path(getattr(_mod, "__file__", None) or "/").resolve().is_relative_to(_ROOT):
        del sys.modules[_name]

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs with HYPOTHESIS_PROFILE=ci: fixed examples, so a red run reproduces exactly.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread for the duration of a test.

    The models under test are tiny: with two threads on two (shared) cores, thread hand-off costs
    ~10x the compute of a 5x5 conv. Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
