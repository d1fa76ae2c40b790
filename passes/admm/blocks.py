"""Block groups of a weight and the closed-form projection onto "pruned or unified" blocks.

A layer's weight ``W`` is read as a matrix ``[rows, cols]`` (Linear: ``[out, in]``; ConvNd:
``[out, in/groups * k...]``; ConvTransposeNd, stored ``[in, out/groups, k...]``, is read the same
way, ``[out, in/groups * k...]``, so ``b_o`` always runs along output channels) and tiled into
``(b_o, b_i)`` blocks in row-major block order. Edge blocks are smaller when ``b_o`` or ``b_i`` do not divide the matrix: every statistic counts real
elements only (``BlockGroup.counts``). The fused experts of a mixture-of-experts layer (transformers'
experts modules: ``gate_up_proj`` ``[E, out, in]``, or ``[E, in, out]`` where the module says
``is_transposed``; the 3-D parameters of a module with ``num_experts`` of them, tiled as stored) are ``E`` matrices, each tiled on its own (``BlockGroup.batch``): no block spans
two experts, and the fractions pruned and unified are those of the whole tensor.

For ``V`` and one block ``b`` with ``n_b`` elements:

* pruning cost ``a_b = ||V_b||^2`` (the squared error of setting the block to 0);
* unification cost ``c_b = sum_i (|V_bi| - u_b)^2 = ||V_b||^2 - n_b u_b^2`` with
  ``u_b = mean_i |V_bi|``, the magnitude that minimises it (a least-squares fit of ``|V_b|`` by one
  value); the unified block is ``s(V_b) * u_b`` with ``s(x) = -1`` for ``x < 0`` and ``+1``
  otherwise: an exact zero is as far from ``-u_b`` as from ``+u_b``, and gets ``+u_b``.

:func:`project` picks ``P`` = the ``round(p n)`` blocks of least ``a_b`` and ``U`` = the
``round(q n)`` blocks of least ``c_b`` among the others (greedy: pruning first, as METHODS.md
section 4 gives it; ties go to the lower block index). It is a projection: projecting its result
again gives the same tensor.

Internals:
    * :func:`blocks_of` pads the matrix with zeros to whole blocks and returns ``[n_blocks,
      b_o * b_i]``; padded cells are zero, add nothing to any block statistic, and
      :func:`from_blocks` drops them again (whatever an operation wrote there).
      :func:`matrices_of` is the ``[batch, rows, cols]`` reading both go through.
    * # NB: the sign of a unified element is ``+1`` for an exact zero (not ``torch.sign``'s 0): with
      0 a unified block of ``[1, 0, 2, 3]`` came out ``[1.5, 0, 1.5, 1.5]``, outside the constraint
      set (its magnitudes differ), not idempotent, and a zero-initialised layer's unified blocks had
      no sign to train their magnitude through.
    * ``block=`` and ``layers=`` are checked here (:func:`check_block`, :func:`block_for`,
      :class:`Layers`) for both the model and the named-parameters paths of ``otofx.admm``.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from otofx.errors import InputError
from otofx.passes.modules import ATTENTION_MODULES as ATTENTION
from otofx.passes.modules import in_projections
from otofx.passes.nodes import is_hf_conv1d

FREE, PRUNED, UNIFIED = 0, 1, 2
log = logging.getLogger("otofx")

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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
    transposed_groups: int = 0  # a ConvTranspose weight [in, out/groups, k...]: its groups (0: not one)

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


def _group(name: str, shape: tuple, block: tuple, batch: bool = False, transposed_groups: int = 0) -> BlockGroup:
    """``batch``: the leading dim counts matrices (fused experts), each tiled on its own.
    ``transposed_groups``: a ConvTranspose weight ``[in, out/groups, k...]`` with that many groups,
    read as ``[out, in/groups * k...]`` as a conv's weight is."""
    lead = shape[0] if batch else 1
    mat = shape[1:] if batch else shape
    rows, cols = mat[0], math.prod(mat[1:])
    if transposed_groups:
        rows, cols = shape[1] * transposed_groups, shape[0] // transposed_groups * math.prod(shape[2:])
    bo, bi = min(block[0], rows), min(block[1], cols)
    return BlockGroup(name, tuple(shape), rows, cols, (bo, bi), (-(-rows // bo), -(-cols // bi)), lead,
                      int(transposed_groups))


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


def whole(name: str, value, least: int = 1) -> int:
    """``value`` as an int >= ``least`` (a whole float is fine), else an InputError naming ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value).is_integer() and value >= least
    if not ok:
        raise InputError(f"{name}={value!r} must be a whole number >= {least}")
    return int(value)


def check_block(block, where: str = "block") -> tuple[int, int]:
    """``block`` as ``(b_o, b_i)``, two positive ints; an InputError naming ``where`` otherwise.

    A single int is refused: ``block=4`` reads as 4x4 to some and as a row of 4 (1x4, the paper's
    other common shape) to others.
    """
    if isinstance(block, numbers.Real) and not isinstance(block, bool):
        raise InputError(f"{where}={block!r} is ambiguous: give both sides (b_o, b_i), e.g. ({block}, {block}) "
                         f"for square blocks or (1, {block}) for rows of {block}")
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise InputError(f"{where}={block!r} must be two positive ints (b_o, b_i), e.g. (4, 4)")
    for x in block:
        if (isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x)
                or not float(x).is_integer() or x < 1):
            raise InputError(f"{where}={tuple(block)!r} must be two positive ints (b_o, b_i), e.g. (4, 4)")
    return int(block[0]), int(block[1])


def check_blocks(block) -> None:
    """Every block of ``block=`` (a pair, or a dict from module name / module type / ``"*"`` to a pair
    or None, None leaving that layer unblocked), checked up front."""
    if not isinstance(block, dict):
        check_block(block)
        return
    for key, b in block.items():
        if not isinstance(key, (str, type)):
            raise InputError(f"block= dict keys are module names, module types or '*'; got {key!r}")
        if b is not None:
            check_block(b, f"block[{key.__name__ if isinstance(key, type) else repr(key)}]")


def block_for(block, names: tuple, m: nn.Module | None):
    """The block ``block=`` gives a weight: the pair itself, or from a dict the first of its
    ``names`` (module name, weight names) found, then the module's most specific type (its class
    or the nearest base class: a key ``nn.Linear`` covers MultiheadAttention's out_proj, a Linear
    subclass), then ``"*"``. None: not blocked."""
    if not isinstance(block, dict):
        return block
    for key in names:
        if key in block:
            return block[key]
    if m is not None:
        for t in type(m).__mro__:
            if t in block:
                return block[t]
    return block.get("*")


class Layers:
    """``layers=``: None (every layer), a module name, a module type, a predicate ``(name, module) ->
    bool``, or a list of names and types. A name matches a module's name or a weight's name
    (``"fc"`` or ``"fc.weight"``); a type matches its subclasses too."""

    def __init__(self, layers):
        self.all, self.pred, self.names, self.types, self.matched = layers is None, None, set(), (), set()
        if layers is None:
            return
        if isinstance(layers, (str, type)):
            layers = [layers]
        elif callable(layers):
            self.pred = layers
            return
        try:
            items = list(layers)
        except TypeError:
            raise InputError(f"layers={layers!r} must be module names, module types, a list of them, or a "
                             "predicate (name, module) -> bool") from None
        bad = [x for x in items if not isinstance(x, (str, type))]
        if bad:
            raise InputError(f"layers= holds {bad[0]!r}: give module names (str) and module types, or a predicate "
                             "(name, module) -> bool")
        self.names = {x for x in items if isinstance(x, str)}
        self.types = tuple(x for x in items if isinstance(x, type))

    def __call__(self, mod_name: str, m: nn.Module | None, weight_names: tuple = ()) -> bool:
        if self.all:
            return True
        if self.pred is not None:
            return bool(self.pred(mod_name, m))
        hit = self.names.intersection((mod_name, *weight_names))
        self.matched |= hit
        return bool(hit) or (m is not None and bool(self.types) and isinstance(m, self.types))

    def check_names(self, where: str) -> None:
        """An InputError for names that matched nothing (a typo would otherwise drop a layer silently)."""
        missing = sorted(self.names - self.matched)
        if missing:
            raise InputError(f"layers= names {missing[:5]} match no {where}: give module names (as named_modules() "
                             "names them) or weight names")


def _parametrised_why(m: nn.Module, attr: str) -> str:
    if parametrize.is_parametrized(m, attr):
        return "computed by a parametrisation (" + ", ".join(type(p).__name__ for p in m.parametrizations[attr]) + ")"
    return "not a parameter (computed from others, as torch.nn.utils.weight_norm does, or a buffer)"


def find_blocks(model: nn.Module, block=(4, 4), layers=None) -> BlockSet:
    """The block groups of ``model``'s Linear, ConvNd and ConvTransposeNd weights, transformers'
    ``Conv1D``, the input projections of ``nn.MultiheadAttention`` (``in_proj_weight``, or
    ``q/k/v_proj_weight``) and the fused weights of transformers' experts modules (``model`` is only
    read).

    ``block``: ``(b_o, b_i)`` (a single int is refused as ambiguous), or a dict from module name,
    weight name or module type (subclasses included, the most specific type first) to a block or
    None (not blocked), ``"*"`` being the default. ``layers``: None (every Linear/Conv), a module name
    or type, a list of module names, weight names and module types, or a predicate ``(name, module)
    -> bool``; a name that matches nothing is an error. A weight that is not a parameter (computed by
    a parametrisation such as ``weight_norm``: Wav2Vec2's positional conv) is skipped, and the log
    says so; one that ``otofx.admm.finish`` parametrised is an error.
    """
    check_blocks(block)
    pick = Layers(layers)
    # NB: a weight tied to another module's (a language model's head and its embedding) is one
    # parameter: it is named as named_parameters() names it, and blocked once
    canonical = {id(p): n for n, p in model.named_parameters()}
    groups, seen, skipped = [], set(), []
    for mod_name, m in model.named_modules():
        hf = is_hf_conv1d(m)
        experts = _experts(m)
        if not (isinstance(m, _LAYER_TYPES + ATTENTION) or hf or experts):
            continue
        # NB: an experts module stored [E, in, out] (is_transposed) is tiled as Conv1D is; one that does
        # not say is tiled as stored, its dim 1 taken as rows (see the warning below)
        swap = hf or (bool(experts) and _layout_stated(m) and m.is_transposed)
        for attr, w in experts or _weights(m):
            if not isinstance(w, torch.Tensor) or w.ndim < 2 or w.numel() == 0 or id(w) in seen:
                continue  # NB: an empty weight (MobileBERT's [0, 128] head at a tiny size) has no block
            local = f"{mod_name}.{attr}" if mod_name else attr
            name = canonical.get(id(w), local)
            if not pick(mod_name, m, (local, name)):
                continue
            b = block_for(block, (mod_name, local, name), m)
            if b is None:
                continue
            if id(w) not in canonical:
                # NB: a parametrised weight is recomputed on every read: blocking it would constrain a
                # tensor nothing trains; its originals are the parameters
                if parametrize.is_parametrized(m, attr) and any(getattr(p, "otofx_block_param", False)
                                                                for p in m.parametrizations[attr]):
                    raise InputError(f"'{local}' is already parametrised by otofx.admm.finish(): finish() and ADMM "
                                     "take a model that was not finished (otofx.admm.plain(model) folds the blocks "
                                     "into plain weights)")
                skipped.append(f"'{local}' ({_parametrised_why(m, attr)})")
                continue
            bb = check_block(b, f"block for layer '{mod_name}'")
            # NB: transformers' Conv1D (GPT-2's projections) stores its weight as [in, out]: the block is
            # (b_o, b_i) in output x input terms, so the stored tensor is tiled (b_i, b_o)
            if swap:
                bb = (bb[1], bb[0])
            seen.add(id(w))  # NB: only once blocked: a holder the block dict skips leaves it to the next
            if experts and not _layout_stated(m) and bb[0] != bb[1]:
                log.warning("otofx.admm: %s does not say whether '%s' is stored [E, out, in] or [E, in, out]; its "
                            "%sx%s blocks are laid on the stored dims 1 x 2 (for the other way give this module "
                            "the block (%s, %s) in a block dict)", type(m).__name__, name, bb[0], bb[1], bb[1], bb[0])
            tg = m.groups if isinstance(m, _CONV_TRANSPOSE) and attr == "weight" else 0
            groups.append(_group(name, tuple(w.shape), bb, batch=bool(experts), transposed_groups=tg))
    if skipped:
        log.warning("otofx.admm: not blocked, as ADMM and finish block parameters: %s (to block one, remove its "
                    "parametrisation first)", ", ".join(skipped))
    pick.check_names("Linear, Conv or attention module or weight")
    if not groups:
        raise InputError("find_blocks found no Linear or Conv weight to block: check `layers=` and `block=`"
                         + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    return BlockSet(tuple(groups))


def matrices_of(w: torch.Tensor, g: BlockGroup) -> torch.Tensor:
    """``w`` as the ``[batch, rows, cols]`` matrices its blocks tile (a ConvTranspose weight
    ``[in, out/groups, k...]`` as ``[1, out, in/groups * k...]``)."""
    if tuple(w.shape) != g.shape:
        raise InputError(f"tensor of shape {tuple(w.shape)} given for block group '{g.name}' of shape {g.shape}")
    if g.transposed_groups:
        n, s = g.transposed_groups, g.shape
        return w.reshape(n, s[0] // n, s[1], -1).transpose(1, 2).reshape(1, g.rows, g.cols)
    return w.reshape(g.batch, g.rows, g.cols)


def _weight_of(m: torch.Tensor, g: BlockGroup) -> torch.Tensor:
    """The inverse of :func:`matrices_of`."""
    if g.transposed_groups:
        n, s = g.transposed_groups, g.shape
        return m.reshape(n, s[1], s[0] // n, -1).transpose(1, 2).reshape(s)
    return m.reshape(g.shape)


def blocks_of(w: torch.Tensor, g: BlockGroup) -> torch.Tensor:
    """``w`` as ``[n_blocks, b_o * b_i]`` (row-major block order, zero-padded edge blocks)."""
    bo, bi = g.block
    nr, nc = g.grid
    m = matrices_of(w, g)
    pr, pc = nr * bo - g.rows, nc * bi - g.cols
    if pr or pc:
        m = torch.nn.functional.pad(m, (0, pc, 0, pr))
    return m.reshape(g.batch, nr, bo, nc, bi).permute(0, 1, 3, 2, 4).reshape(g.batch * nr * nc, bo * bi)


def from_blocks(b: torch.Tensor, g: BlockGroup) -> torch.Tensor:
    """The inverse of :func:`blocks_of`: a tensor of the weight's shape."""
    bo, bi = g.block
    nr, nc = g.grid
    m = b.reshape(g.batch, nr, nc, bo, bi).permute(0, 1, 3, 2, 4).reshape(g.batch, nr * bo, nc * bi)
    return _weight_of(m[:, :g.rows, :g.cols], g)


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
    for name, x in (("prune", prune), ("unify", unify)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise InputError(f"{name}={x!r} must be a number, a fraction of each layer's blocks in [0, 1]")
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
    # NB: an exact zero gets +u_b, not torch.sign's 0 (the module docstring says why)
    b = torch.where((state == UNIFIED)[:, None], torch.where(b < 0, -mag[:, None], mag[:, None]), b)
    return Projection(from_blocks(b, g), state, mag)


def select_layers(named: Iterable, blockset: BlockSet) -> list:
    """``(group, parameter)`` pairs for the block groups found among ``named`` parameters."""
    params = dict(named)
    missing = [g.name for g in blockset if g.name not in params]
    if missing:
        raise InputError(f"block groups {missing[:3]} name no parameter of the model: find_blocks on the same model")
    return [(g, params[g.name]) for g in blockset]
