"""DHSPG and HESSO on sharded parameters (FSDP2's ``fully_shard``, tensor parallelism: DTensors).

A ZIG row's elements may live on several processes: the output rows of a dim-0-sharded weight are
split between ranks by row, and its input columns (a consumer's slice of an earlier group's row) are
split across every rank. The optimizers handle that in three pieces per step:

1. each rank reduces its **local shard**: per-row ``||x||^2``, ``x.d``, ``||d||^2`` over the
   elements it holds (any backend: the torch reference, the C kernel, Triton);
2. **one all-reduce** (sum) of the concatenated per-row vectors (``3 * n_rows`` numbers, not the
   weights) gives every rank the sums over whole rows, bit-identical on every rank;
3. the partition, lambda, projection and sparsity-controller decisions are made from those sums,
   identically everywhere, and the write-back runs on the local shards.

This module holds the pieces the optimizers use (:class:`Shards`: the local slice of every row
tensor from its placements, the shard's row layout, the reductions) and the user-facing helpers:

* :func:`optimizer_state_dict` / :func:`load_optimizer_state_dict`: the optimizer's state for
  ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``/``set_optimizer_state_dict`` plus
  DHSPG's/HESSO's own state: step, partition, controller);
* :func:`unsharded_copy`: the model with full tensors (a collective: every rank calls it);
* :func:`compress`: gathers the full tensors, compresses on one rank and writes it with
  ``otofx.save`` (``OTO.compress()`` on a sharded model gathers too, on every rank).

Internals:
    * The local slice of a DTensor follows its placements in mesh-dim order: ``Shard(d)`` on a mesh
      dim of size n gives coordinate c the c-th of n chunks of ``ceil(L / n)`` (``torch.chunk``'s
      split, as FSDP2 and DTensor use; trailing chunks may be empty); it is checked against the
      local tensor's shape. ``Replicate`` copies add up once: only the copy at coordinate 0 enters
      the sums (plain tensors: only the reduction group's first rank), but every copy is updated.
      ``Partial`` and strided shards are refused with an :class:`ShardingError`.
    * The layouts are ``kernels.build_layout(..., partial=True)`` over the local shapes: positions
      held by another rank are -1, row lengths are the whole rows'. The global layout is built once
      on the CPU to validate the groups (so a bad group fails on every rank alike).
    * The all-reduce runs over the ranks of the parameters' device mesh (the default group when
      the mesh spans the world). NB: collectives need every rank: ``opt.group_sparsity``,
      ``opt.status()`` and ``opt.row_stats()`` reduce too, so call them on every rank.
    * A step's finite-gradient flag is reduced (max) before anything changes, since one rank's
      shard may hold the NaN: a second, one-element all-reduce when ``check_finite`` is on.
"""
from __future__ import annotations

import copy
import io
import logging
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from otofx.errors import OTOError

log = logging.getLogger("otofx")

EXTRA_KEY = "otofx"  # DHSPG's/HESSO's own state in a distributed optimizer state_dict (pickled bytes)


class ShardingError(OTOError):
    """The parameters' sharding cannot be handled (placements, meshes)."""


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked without importing it)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "device_mesh") and hasattr(t, "placements")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is a DTensor (FSDP2, tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


def _local_ranges(t, name: str):
    """``(ranges, contributes)``: per dim ``(start, length)`` of ``t``'s local shard in the whole tensor,
    and whether this copy enters the row sums (see the module docstring)."""
    from torch.distributed.tensor.placement_types import Shard

    shape = tuple(t.shape)
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ShardingError(f"parameter {name!r}: this rank is not in its device mesh; build the optimizer on the "
                            "mesh's ranks only")
    ranges = [(0, s) for s in shape]
    contributes = True
    for i, p in enumerate(t.placements):
        if type(p) is Shard:
            d = p.dim % len(shape)
            start, length = ranges[d]
            n = mesh.size(i)
            chunk = -(-length // n) if length else 0
            s = min(coord[i] * chunk, length)
            e = min(s + chunk, length)
            ranges[d] = (start + s, e - s)
        elif p.is_replicate():
            contributes = contributes and coord[i] == 0
        else:
            raise ShardingError(f"parameter {name!r} has placement {p} on mesh dim {i}: DHSPG/HESSO take parameters "
                                "sharded with Shard(dim) or replicated (FSDP2's fully_shard, ColwiseParallel/"
                                "RowwiseParallel); redistribute it to Shard or Replicate first")
    want = tuple(n for _, n in ranges)
    got = tuple(t.to_local().shape)
    if want != got:
        raise ShardingError(f"parameter {name!r}: its local shard has shape {got}, but its placements "
                            f"{tuple(t.placements)} give {want} (torch.chunk's split): uneven custom shardings are "
                            "not understood")
    return tuple(ranges), contributes


def restrict(entries_of, ranges, include=None):
    """Row entries ``(rows, [(tensor, dim, index[rows, k])])`` over whole tensors, restricted to the
    slices ``ranges[tensor][dim] = (start, length)``: positions inside become local (``- start``),
    the others -1 (``kernels.build_layout(..., partial=True)``); ``include[tensor]`` False drops a
    tensor's entries (a replica that does not enter the sums)."""
    out = []
    for rows, entries in entries_of:
        loc = []
        for t, dim, idx in entries:
            if include is not None and not include[t]:
                continue
            dim = dim % len(ranges[t])
            start, length = ranges[t][dim]
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(int(rows), -1)
            inside = (idx >= start) & (idx < start + length)
            loc.append((t, dim, torch.where(inside, idx - start, torch.full_like(idx, -1))))
        out.append((rows, loc))
    return out


def mesh_group(mesh):
    """A process group over every rank of ``mesh`` (None: the default group)."""
    ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    # NB: a collective over the whole world: every rank must build the optimizer (SPMD)
    return dist.new_group(ranks)


class Shards:
    """The local slices of an optimizer's row tensors and the reduction of per-row sums across ranks."""

    def __init__(self, tensors, names):
        meshes = [t.device_mesh for t in tensors if is_dtensor(t)]
        mesh = meshes[0]
        for m in meshes[1:]:
            if m != mesh:
                raise ShardingError("the row parameters are DTensors on different device meshes: DHSPG/HESSO need "
                                    "one mesh for them (shard the model with one mesh)")
        ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
        self.group = mesh_group(mesh)
        self.ranks = tuple(ranks)
        first = dist.get_rank() == ranks[0]
        self.ranges, self.contributes = [], []
        for t, name in zip(tensors, names):
            if is_dtensor(t):
                r, c = _local_ranges(t, name)
            else:
                r, c = tuple((0, s) for s in t.shape), first  # a plain tensor: the same on every rank
            self.ranges.append(r)
            self.contributes.append(c)
        self.global_shapes = tuple(torch.Size(t.shape) for t in tensors)
        self.local_shapes = tuple(torch.Size(n for _, n in r) for r in self.ranges)

    def local_groups(self, entries_of, contributing_only: bool = False):
        """``entries_of`` (global positions) restricted to the local shards: positions held elsewhere are -1."""
        return restrict(entries_of, self.ranges, self.contributes if contributing_only else None)

    def layouts(self, entries_of, device):
        """``(layout, stats_layout, global_row_len)``: the shard's layout for the write-back (every local
        element) and for the sums (the elements this copy contributes; the same object when all do)."""
        from otofx import kernels

        whole = kernels.build_layout(self.global_shapes, entries_of, device="cpu")  # validates the groups
        row_len = whole.row_len
        lay = kernels.build_layout(self.local_shapes, self.local_groups(entries_of), device=device, partial=True,
                                   row_len=row_len)
        if all(self.contributes):
            return lay, lay
        stats = kernels.build_layout(self.local_shapes, self.local_groups(entries_of, True), device=device,
                                     partial=True, row_len=row_len)
        return lay, stats

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return t

    def reduce_stats(self, st):
        """Per-row sums over every shard: one all-reduce of ``[xx; xd; dd]``."""
        from otofx.kernels import RowStats

        n = st.xx.numel()
        buf = torch.cat([st.xx, st.xd, st.dd])
        self.all_reduce(buf)
        return RowStats(buf[:n], buf[n:2 * n], buf[2 * n:])

    def reduce_flag(self, flag: torch.Tensor) -> torch.Tensor:
        """A skip flag set on any rank is set on every rank (max)."""
        return self.all_reduce(flag.clone(), dist.ReduceOp.MAX)


# -- checkpoints ----------------------------------------------------------------------------------

def _pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data):
    if isinstance(data, (bytes, bytearray)):
        return torch.load(io.BytesIO(data), weights_only=True)
    if isinstance(data, io.BytesIO):
        data.seek(0)
        return torch.load(data, weights_only=True)
    return data


def optimizer_state_dict(model: nn.Module, opt, options=None) -> dict:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, opt)`` plus the
    optimizer's own state (step counters, partition, controller) under ``"otofx"``, ready for
    ``torch.distributed.checkpoint.save``, or, from a fresh optimizer, as the template that
    ``torch.distributed.checkpoint.load`` fills (its moment buffers are zeros until then). Every
    rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # NB: torch's helper would create missing state by calling step() with zero gradients, which
    # would move DHSPG's clock (and make its partition); the state is created without a step instead
    opt._placeholder_state()
    with opt._no_init_step():
        osd = get_optimizer_state_dict(model, opt, options=options)
    osd[EXTRA_KEY] = _pack(opt.state_dict()[EXTRA_KEY])
    return osd


def load_optimizer_state_dict(model: nn.Module, opt, osd: dict, options=None) -> None:
    """The inverse of :func:`optimizer_state_dict` (after ``torch.distributed.checkpoint.load`` into
    a state_dict made by :func:`optimizer_state_dict` of a fresh optimizer). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if EXTRA_KEY not in osd:
        raise OTOError("this optimizer state_dict has no 'otofx' entry: save it with otofx.distributed."
                       "optimizer_state_dict(model, opt)")
    extra = _unpack(osd[EXTRA_KEY])
    rest = {k: v for k, v in osd.items() if k != EXTRA_KEY}
    opt._pending_extra = extra
    try:
        with opt._no_init_step():
            set_optimizer_state_dict(model, opt, rest, options=options)
    finally:
        opt._pending_extra = None


# -- gathering and compressing --------------------------------------------------------------------

def _plain_class(cls: type) -> type:
    """The user's class behind FSDP2's dynamic ``FSDP<Class>`` subclass."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return cls
    if not issubclass(cls, FSDPModule):
        return cls
    return next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


_DIST_ATTR_PREFIXES = ("__composable_api_state_key",)
_DIST_ATTRS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


@torch.no_grad()
def unsharded_copy(model: nn.Module, keep: bool = True) -> nn.Module | None:
    """A copy of ``model`` whose parameters are the full tensors (``DTensor.full_tensor()``), of the
    model's own classes (FSDP2's ``FSDP<Class>`` reverted), without hooks; buffers are copied.

    A collective: every rank of the parameters' meshes calls it, in the same order. Tensors shared
    between modules stay shared. ``keep=False`` (the ranks that only help gather) drops each full
    tensor as soon as it is gathered and returns None. # NB: the copy shares the model's other attributes (configs, lists):
    treat it as read-only, as compress does (it copies again).
    """
    memo: dict = {}

    def tensor(v, param: bool):
        if v is None:
            return None
        if id(v) in memo:
            return memo[id(v)]
        full = v.full_tensor() if is_dtensor(v) else v
        if not keep:
            return None
        new = full.detach().clone()
        if param:
            new = nn.Parameter(new, requires_grad=v.requires_grad)
        memo[id(v)] = new
        return new

    def walk(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        cls = _plain_class(type(m))
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)
        memo[id(m)] = new
        new.__dict__["_parameters"] = {k: tensor(v, True) for k, v in m._parameters.items()}
        new.__dict__["_buffers"] = {k: tensor(v, False) for k, v in m._buffers.items()}
        new.__dict__["_modules"] = {k: None if c is None else walk(c) for k, c in m._modules.items()}
        for h in _HOOK_DICTS:
            if h in m.__dict__:
                new.__dict__[h] = OrderedDict()
        for k in list(new.__dict__):  # FSDP2's and the composable APIs' state (which refuses deepcopy)
            if k.startswith(_DIST_ATTR_PREFIXES) or k in _DIST_ATTRS:
                del new.__dict__[k]
        return new

    out = walk(model)
    return out if keep else None


def _unsharded_oto(oto, keep: bool = True):
    """A shallow copy of ``oto`` over an unsharded copy of its model (a collective; None unless ``keep``)."""
    import torch.fx as fx

    full = unsharded_copy(oto.model, keep)
    if full is None:
        return None
    view = copy.copy(oto)
    view.model = full
    view._optimizers = []  # their status would need collectives on the other ranks
    if oto.frontend == "symbolic_trace":  # the graph holds the model's own (sharded) submodules
        gm = fx.GraphModule(full, copy.deepcopy(oto.graph_module.graph))
        view.graph_module = gm
        view.state = oto.state.replace(gm=gm)
    return view


def compress_sharded(oto, **kw):
    """``oto.compress(**kw)`` of a sharded model on every rank (what ``OTO.compress`` calls)."""
    oto._warn_below_target()  # a collective too (the optimizers' group sparsity)
    return _unsharded_oto(oto).compress(**kw)


def compress(oto, path=None, *, rank: int = 0, **kw):
    """Gather the full tensors of ``oto.model`` (sharded), compress on ``rank`` and, with ``path``, write
    the compressed model there with ``otofx.save``. Every rank calls it; ``rank`` returns the
    compressed model, the others None."""
    oto._warn_below_target()
    view = _unsharded_oto(oto, keep=dist.get_rank() == rank)
    if view is None:
        return None
    small = view.compress(**kw)
    if path is not None:
        from otofx.saveload import save

        save(small, path)
        log.info("otofx: rank %d wrote the compressed model to %s", rank, path)
    return small


__all__ = ["Shards", "ShardingError", "is_dtensor", "is_sharded", "local", "optimizer_state_dict",
           "load_optimizer_state_dict", "unsharded_copy", "compress"]
