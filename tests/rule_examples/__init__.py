"""Small models that put each operator rule between prunable producers and consumers.

``EXAMPLES[rule_name]`` is a list of zero-argument factories returning ``(model, example_input)``:
tiny channels (4-8), tiny spatial sizes (5x5), every spelling of the op we know of (module,
functional, tensor method, operator, ATen through ``torch.export``).

A factory may carry attributes read by ``test_rules.py``:

* ``pinned``: the example is expected to have *no* group; the value is a substring of the reason of
  a pin that must be reported in ``oto.pinned`` (e.g. softmax over the channel axis).
* ``expect_pin``: the example has groups, and a pin whose reason contains this substring must also
  be reported (e.g. layer norm over channels, beside a prunable hidden layer).
* ``frontend``: the front-end ``otofx.OTO`` must pick ("symbolic_trace" unless stated).

One file per rule family, named as in ``passes/rules/`` (an example is filed with the family of
the first rule it lists: ``conv`` examples are in ``linalg.py``); ``common.py`` holds what they
share. Models are built under a fixed seed; ``conftest.randomize`` is applied by the tests.
"""
from __future__ import annotations

import importlib

from .common import CIN, E_, EXAMPLES, HD_, HW, H_, N, Net, conv, example, img  # noqa: F401

FAMILIES = ("attention", "elementwise", "indexing", "linalg", "norm", "recurrent", "reduction", "shape", "sizes",
            "spatial")

# every factory and helper class is also reachable as ``rule_examples.<name>``
for _family in FAMILIES:
    _module = importlib.import_module(f"{__name__}.{_family}")
    globals().update({k: v for k, v in vars(_module).items() if getattr(v, "__module__", None) == _module.__name__})
