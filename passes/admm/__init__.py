"""Micro-structured blocks (seed 002): block groups inside weights, and their exact projection.

The analysis and rewrite half of the ADMM method (``otofx.admm`` holds its optimizer, finishing
step and storage format):

* :func:`find_blocks` partitions the weight of every Conv/Linear layer (a conv weight, transposed
  or not, read as ``[out, in/groups * kh * kw]``) into ``(b_o, b_i)`` blocks: a :class:`BlockSet` of
  :class:`BlockGroup` s, one per layer. Block groups are a second kind of group beside the ZIG rows
  of ``otofx.passes.zigs``: removing a block changes no shape, it makes the weight sparse or shared.
* :func:`project` is the Z-step of ADMM (``METHODS.md`` section 4): per layer, the ``round(p * n)``
  blocks of least squared norm are pruned (zero), then the ``round(q * n)`` blocks of least
  unification cost among the rest are unified (one magnitude, their own signs).

Internals:
    * everything lives in :mod:`.blocks` (also the ``block=`` / ``layers=`` checks that
      ``otofx.admm`` shares); this package re-exports its public part.
"""
from .blocks import (BlockGroup, BlockSet, Projection, block_stats, blocks_of, find_blocks, from_blocks, matrices_of,
                     project)

__all__ = ["BlockGroup", "BlockSet", "Projection", "find_blocks", "blocks_of", "from_blocks", "matrices_of",
           "block_stats", "project"]
