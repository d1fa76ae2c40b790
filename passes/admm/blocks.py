"""Block groups of a weight and the closed-form projection onto "pruned or unified" blocks.

A layer's weight ``W`` is read as a matrix ``[rows, cols]`` (Linear: ``[out, in]``; ConvNd:
``[out, in/groups * k...]``) and tiled into ``(b_o, b_i)`` blocks in row-major block order. Edge
blocks are smaller when ``b_o`` or ``b_i`` do not divide the matrix: every statistic counts real
elements only (``BlockGroup.counts``). The fused experts of a mixture-of-experts layer (transformers'
experts modules: ``gate_up_proj`` ``[E, out, in]``, or ``[E, in, out]`` where the module says
``is_transposed``; the 3-D parameters of a module with ``num_experts`` of them, tiled as stored) are ``E`` matrices, each tiled on its own (``BlockGroup.batch``): no block spans
two experts, and the fractions pruned and unified are those of the whole tensor.

For ``V`` and one block ``b`` with ``n_b`` elements:

* pruning cost ``a_b = ||V_b||^2`` (the squared error of setting the block to 0);
* unification cost ``c_b = sum_i (|V_bi| - u_b)^2 = ||V_b||^2 - n_b u_b^2`` with
  ``u_b = mean_i |V_bi|``, the magnitude that minimises it (a least-squares fit of ``|V_b|`` by one
  value); the unified block is ``sign(V_b) * u_b``.

:func:`project` picks ``P`` = the ``round(p n)`` blocks of least ``a_b`` and ``U`` = the
``round(q n)`` blocks of least ``c_b`` among the others (greedy: pruning first, as METHODS.md
section 4 gives it; ties go to the lower block index). It is a projection: projecting its result
again gives the same tensor.

Internals:
    * :func:`blocks_of` pads the matrix with zeros to whole blocks and returns ``[n_blocks,
      b_o * b_i]``; padded cells are zero, have sign 0, and so stay zero through every operation
      here. :func:`from_blocks` drops them again.
    * # NB: a unified block whose elements include exact zeros keeps them at zero (sign(0) = 0), so
      "equal magnitudes" means equal among its non-zero elements; random or trained weights have
      none.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from otofx.errors import InputError
from otofx.passes.modules import ATTENTION_MODULES as ATTENTION
from otofx.passes.modules import in_projections
from otofx.passes.nodes import is_hf_conv1d

FREE, PRUNED, UNIFIED = 0, 1, 2
log = logging.getLogger("otofx")

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weights(m: nn.Module) -> list:
    """``[(attribute, tensor)]``: the weights of a layer module that block groups tile (an attention
    module's input projections are [out, in] weights of its own; its ``out_proj`` is a Linear, found
    as a module of its own)."""
    if isinstance(m, ATTENTION):
        return in_projections(m)
    return [("weight", getattr(m, "weight", None))]


@dataclass(frozen=True)
class BlockGroup:
    """The blocks of one weight: ``name`` (a parameter name), its shape, and the block grid."""

    name: str
    shape: tuple  # the weight's shape
    rows: int  # matrix rows (output channels)
    cols: int  # matrix columns (in/groups * kernel elements)
    block: tuple  # (b_o, b_i), clipped to the matrix
    grid: tuple  # (blocks along rows, blocks along cols)
    batch: int = 1  # matrices in the tensor (a fused experts tensor [E, rows, cols]: E)

    @property
    def n_blocks(self) -> int:
        return self.batch * self.grid[0] * self.grid[1]

    @property
    def numel(self) -> int:
        return self.batch * self.rows * self.cols

    @property
    def counts(self) -> torch.Tensor:
        """Real elements per block (edge blocks may be smaller), ``[n_blocks]`` int64."""
        bo, bi = self.block
        nr, nc = self.grid
        r = torch.full((nr,), bo, dtype=torch.int64)
        r[-1] = self.rows - bo * (nr - 1)
        c = torch.full((nc,), bi, dtype=torch.int64)
        c[-1] = self.cols - bi * (nc - 1)
        return (r[:, None] * c[None, :]).reshape(-1).repeat(self.batch)


@dataclass(frozen=True)
class BlockSet:
    """Block groups of a model, in module order."""

    groups: tuple

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def n_blocks(self) -> int:
        return sum(g.n_blocks for g in self.groups)

    def by_name(self) -> dict:
        return {g.name: g for g in self.groups}


def _group(name: str, shape: tuple, block: tuple, batch: bool = False) -> BlockGroup:
    """``batch``: the leading dim counts matrices (fused experts), each tiled on its own."""
    lead = shape[0] if batch else 1
    mat = shape[1:] if batch else shape
    rows, cols = mat[0], math.prod(mat[1:])
    bo, bi = min(block[0], rows), min(block[1], cols)
    return BlockGroup(name, tuple(shape), rows, cols, (bo, bi), (-(-rows // bo), -(-cols // bi)), lead)


def _experts(m: nn.Module) -> list:
    """``[(attribute, tensor)]``: the fused [E, ., .] weights of an experts module, or []: a
    transformers experts module (its ``use_experts_implementation`` marks it with ``is_transposed``),
    or any module whose ``num_experts`` (or ``num_local_experts``) is the leading dim of its 3-D
    parameters (Llama 4's experts, read by ``torch.bmm``; JetMoE's)."""
    found = [(n, p) for n, p in m.named_parameters(recurse=False) if p.ndim == 3 and p.is_floating_point()]
    if _layout_stated(m) and hasattr(m, "is_concatenated"):
        return found
    e = getattr(m, "num_experts", getattr(m, "num_local_experts", None))
    return [(n, p) for n, p in found if p.shape[0] == e] if isinstance(e, int) and e > 0 else []


def _layout_stated(m: nn.Module) -> bool:
    """Whether an experts module says how its matrices are stored (transformers' ``is_transposed``)."""
    return isinstance(getattr(m, "is_transposed", None), bool)


def _selector(layers) -> Callable[[str, nn.Module], bool]:
    if layers is None:
        return lambda name, m: True
    if callable(layers) and not isinstance(layers, type):
        return layers
    if isinstance(layers, type):
        layers = (layers,)
    names = {x for x in layers if isinstance(x, str)}
    types = tuple(x for x in layers if isinstance(x, type))
    return lambda name, m: name in names or (bool(types) and isinstance(m, types))


def find_blocks(model: nn.Module, block=(4, 4), layers=None) -> BlockSet:
    """The block groups of ``model``'s Linear and ConvNd weights, transformers' ``Conv1D``, the
    input projections of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``)
    and the fused weights of transformers' experts modules (``model`` is only read).

    ``block``: ``(b_o, b_i)``, or a dict from module name (or module type) to a block for per-layer
    shapes, ``"*"`` being the default. ``layers``: None (every Linear/Conv), module names, module
    types, or a predicate ``(name, module) -> bool``.
    """
    pick = _selector(layers)
    # NB: a weight tied to another module's (a language model's head and its embedding) is one
    # parameter: it is named as named_parameters() names it, and blocked once
    canonical = {id(p): n for n, p in model.named_parameters()}
    groups, seen = [], set()
    for mod_name, m in model.named_modules():
        hf = is_hf_conv1d(m)
        experts = _experts(m)
        if not (isinstance(m, _LAYER_TYPES + ATTENTION) or hf or experts) or not pick(mod_name, m):
            continue
        # NB: an experts module stored [E, in, out] (is_transposed) is tiled as Conv1D is; one that does
        # not say is tiled as stored, its dim 1 taken as rows (see the warning below)
        swap = hf or (bool(experts) and _layout_stated(m) and m.is_transposed)
        for attr, w in experts or _weights(m):
            if not isinstance(w, torch.Tensor) or w.ndim < 2 or w.numel() == 0 or id(w) in seen:
                continue  # NB: an empty weight (MobileBERT's [0, 128] head at a tiny size) has no block
            b = block
            if isinstance(block, dict):
                b = block.get(mod_name, block.get(type(m), block.get("*")))
                if b is None:
                    continue
            if len(b) != 2 or min(int(b[0]), int(b[1])) < 1:
                raise InputError(f"block {b!r} for layer '{mod_name}' must be two positive ints (b_o, b_i)")
            name = canonical.get(id(w), f"{mod_name}.{attr}" if mod_name else attr)
            # NB: transformers' Conv1D (GPT-2's projections) stores its weight as [in, out]: the block is
            # (b_o, b_i) in output x input terms, so the stored tensor is tiled (b_i, b_o)
            bb = (int(b[1]), int(b[0])) if swap else (int(b[0]), int(b[1]))
            seen.add(id(w))  # NB: only once blocked: a holder the block dict skips leaves it to the next
            if experts and not _layout_stated(m) and bb[0] != bb[1]:
                log.warning("otofx.admm: %s does not say whether '%s' is stored [E, out, in] or [E, in, out]; its "
                            "%sx%s blocks are laid on the stored dims 1 x 2 (for the other way give this module "
                            "the block (%s, %s) in a block dict)", type(m).__name__, name, bb[0], bb[1], bb[1], bb[0])
            groups.append(_group(name, tuple(w.shape), bb, batch=bool(experts)))
    if not groups:
        raise InputError("find_blocks found no Linear or Conv weight to block: check `layers=`")
    return BlockSet(tuple(groups))


def blocks_of(w: torch.Tensor, g: BlockGroup) -> torch.Tensor:
    """``w`` as ``[n_blocks, b_o * b_i]`` (row-major block order, zero-padded edge blocks)."""
    if tuple(w.shape) != g.shape:
        raise InputError(f"tensor of shape {tuple(w.shape)} given for block group '{g.name}' of shape {g.shape}")
    bo, bi = g.block
    nr, nc = g.grid
    m = w.reshape(g.batch, g.rows, g.cols)
    pr, pc = nr * bo - g.rows, nc * bi - g.cols
    if pr or pc:
        m = torch.nn.functional.pad(m, (0, pc, 0, pr))
    return m.reshape(g.batch, nr, bo, nc, bi).permute(0, 1, 3, 2, 4).reshape(g.batch * nr * nc, bo * bi)


def from_blocks(b: torch.Tensor, g: BlockGroup) -> torch.Tensor:
    """The inverse of :func:`blocks_of`: a tensor of the weight's shape."""
    bo, bi = g.block
    nr, nc = g.grid
    m = b.reshape(g.batch, nr, nc, bo, bi).permute(0, 1, 3, 2, 4).reshape(g.batch, nr * bo, nc * bi)
    return m[:, :g.rows, :g.cols].reshape(g.shape)


def block_stats(v: torch.Tensor, g: BlockGroup):
    """Per block ``(a_b, c_b, u_b)``: pruning cost, unification cost, mean magnitude (float64)."""
    b = blocks_of(v.detach(), g).to(torch.float64)
    sq = b.square().sum(1)
    u = b.abs().sum(1) / g.counts.to(torch.float64).to(b.device)
    c = (sq - g.counts.to(b.device) * u.square()).clamp_min(0.0)
    return sq, c, u


@dataclass(frozen=True)
class Projection:
    """The result of :func:`project` for one block group."""

    z: torch.Tensor  # the projected weight (the input's shape and dtype)
    state: torch.Tensor  # [n_blocks] int64: FREE, PRUNED or UNIFIED
    magnitude: torch.Tensor  # [n_blocks]: u_b of unified blocks, 0 elsewhere (the input's dtype)


def counts_for(n: int, prune: float, unify: float) -> tuple[int, int]:
    """Blocks pruned and unified out of ``n`` (nearest integers, halves rounded up)."""
    if not (0.0 <= prune <= 1.0 and 0.0 <= unify <= 1.0 and prune + unify <= 1.0 + 1e-12):
        raise InputError(f"prune={prune!r} and unify={unify!r} must be fractions in [0, 1] with prune + unify <= 1")
    n_p = min(n, math.floor(prune * n + 0.5))
    n_u = min(n - n_p, math.floor(unify * n + 0.5))
    return n_p, n_u


def project(v: torch.Tensor, g: BlockGroup, prune: float, unify: float = 0.0) -> Projection:
    """The Euclidean-greedy projection of ``v`` onto "``prune`` of the blocks zero, ``unify`` unified"."""
    n = g.n_blocks
    n_p, n_u = counts_for(n, prune, unify)
    a, c, u = block_stats(v, g)
    state = torch.zeros(n, dtype=torch.int64, device=v.device)
    order = torch.argsort(a, stable=True)
    state[order[:n_p]] = PRUNED
    if n_u:
        c = c.masked_fill(state == PRUNED, float("inf"))
        state[torch.argsort(c, stable=True)[:n_u]] = UNIFIED
    b = blocks_of(v.detach(), g)
    mag = torch.where(state == UNIFIED, u, torch.zeros_like(u)).to(b.dtype)
    b = torch.where((state == PRUNED)[:, None], torch.zeros_like(b), b)
    b = torch.where((state == UNIFIED)[:, None], torch.sign(b) * mag[:, None], b)
    return Projection(from_blocks(b, g), state, mag)


def select_layers(named: Iterable, blockset: BlockSet) -> list:
    """``(group, parameter)`` pairs for the block groups found among ``named`` parameters."""
    params = dict(named)
    missing = [g.name for g in blockset if g.name not in params]
    if missing:
        raise InputError(f"block groups {missing[:3]} name no parameter of the model: find_blocks on the same model")
    return [(g, params[g.name]) for g in blockset]
