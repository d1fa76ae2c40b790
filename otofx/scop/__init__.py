"""SCOP (Tang et al., NeurIPS 2020): knockoff-controlled pruning of a trained model over otofx's groups.

    scores = oto.scop(loader)                      # one tensor per group, higher = keep
    small = oto.prune_lowest(scores, ratio=0.5, loader=loader)
    otofx.scop.finetune(small, loader, epochs=10, lr=0.05)

* :mod:`otofx.scop.knockoffs` -- Gaussian model-X knockoffs and batch permutation.
* :mod:`otofx.scop.select` -- the knockoff stage (betas trained through the selection-layer pass,
  :mod:`otofx.passes.scop`) and the scores ``|gamma| (2 beta - 1)``.
* :mod:`otofx.scop.scores` -- SCOP's and the baselines' scores (L1, BN |gamma|, random).
* :mod:`otofx.scop.prune` -- ``prune_lowest``: any scores -> a smaller GraphModule.
* :mod:`otofx.scop.finetune` -- a plain SGD fine-tuning loop.

Internals:
    * Nothing here changes the user's model: the knockoff stage trains a deep copy of the captured
      graph, and ``prune_lowest`` returns a new GraphModule (``oto.compress(plan=...)``).
"""
from . import scores
from .finetune import finetune
from .knockoffs import GaussianKnockoffs, permute
from .prune import choose_rows, prune_lowest, reestimate_bn
from .select import ScopResult, row_gammas, train_betas

__all__ = ["scores", "finetune", "GaussianKnockoffs", "permute", "prune_lowest", "choose_rows", "reestimate_bn",
           "ScopResult", "train_betas", "row_gammas"]
