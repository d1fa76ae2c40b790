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

# Under pytest-xdist (`-n N`, README's test command) the N workers share the cores: each takes its
# share of torch's intra-op threads, or N x the cores' threads would contend.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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
def spatial_capture_to_its_end(monkeypatch):
    """The capture with dynamic image sizes runs to its end (a budget of 300 s, not one measured off the
    first capture's time), for a test that runs the graph form at another image size: on a loaded
    machine the timed budget can run out, and the graph form then takes the example's size only.
    Not for every test: swin's dynamic capture takes minutes, and most graphs never see another size."""
    from otofx import capture

    monkeypatch.setattr(capture, "SPATIAL_MIN_SECONDS", 300.0)
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
