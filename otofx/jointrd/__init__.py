"""JointRD (Li et al., NeurIPS 2020): plain networks without shortcuts, distilled from their ResNet.

* ``remove_shortcuts(model, example_inputs, keep_projections=True, dirac=False)``: a new
  GraphModule without the model's identity residual adds (``otofx.passes.jointrd``).
* ``JointRD(student, teacher, boundaries=None, mode="paper")``: the joint training loss (hybrid
  student-head/teacher-tail paths, feature distillation); ``jrd.export()`` the plain student.
* ``fold_dirac(student)``: a copy with Dirac weights folded into plain ones; ``plain(student)``.
* ``peak_activation_memory(model, x)``: measured peak bytes of activations in one forward.
* ``residual_adds(model, x)``: the residual adds found in a model's graph.

Internals:
    * Graph passes live in ``otofx.passes.jointrd``; this package wires them into otofx's pipeline
      (``shortcuts``), the training wrapper (``train``) and the measurement (``memory``).
"""
from otofx.passes.jointrd import ResidualAdd, ShortcutRecord, StageError

from .memory import MemoryPeak, peak_activation_memory
from .shortcuts import fold_dirac, plain, remove_shortcuts, residual_adds
from .train import MODES, JointRD, JointRDTerms

__all__ = ["remove_shortcuts", "residual_adds", "fold_dirac", "plain", "JointRD", "JointRDTerms", "MODES",
           "peak_activation_memory", "MemoryPeak", "ResidualAdd", "ShortcutRecord", "StageError"]
