"""tests/gpu: tests that need a CUDA device; every test here is skipped when CUDA is absent.

Run them on a GPU machine with the compiled Triton kernels (the suite's root conftest defaults
``TRITON_INTERPRET=1`` for the CPU interpreter):

    TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/gpu
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(_HERE):
            item.add_marker(skip)
