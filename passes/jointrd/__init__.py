"""JointRD's graph passes (installed as ``otofx.passes.jointrd``).

Residual-add detection and removal (:mod:`.residual`), Dirac reparametrisation and its fold
(:mod:`.dirac`), stage boundaries and graph cuts (:mod:`.stages`). ``otofx.jointrd`` builds the
public API and the training wrapper on them.

Internals:
    * Every pass reads shapes from ``node.meta['val']`` (``otofx.passes.shapes.propagate_shapes``)
      and rewrites the GraphModule it is given in place; ``otofx.jointrd`` copies first.
"""
from .dirac import Dirac, apply_dirac, dirac_sites, fold_dirac
from .residual import (ResidualAdd, ShortcutRecord, classify, find_residual_adds, is_add, is_drop_path,
                       remove_residual_adds)
from .stages import StageError, equal_boundaries, find_boundaries, stream_output, tail, tap

__all__ = ["Dirac", "apply_dirac", "dirac_sites", "fold_dirac", "ResidualAdd", "ShortcutRecord", "classify",
           "find_residual_adds", "is_add", "is_drop_path", "remove_residual_adds", "StageError", "equal_boundaries",
           "find_boundaries", "stream_output", "tail", "tap"]
