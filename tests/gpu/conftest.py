"""tests/gpu: tests that need a CUDA device; every test here is skipped when CUDA is absent.

Run them on a GPU machine with the compiled Triton kernels (the suite's root conftest defaults
``TRITON_INTERPRET=1`` for the CPU interpreter):

    TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/gpu

Every test here runs with TF32 off (``no_tf32``): cuDNN convolutions and CUDA matmuls use it by
default, which would put a float32 comparison ~1e-3 apart for reasons unrelated to pruning.
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


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 off for the test (cuDNN and CUDA matmuls), restored after it."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
