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
    * The local slice of a DTensor follows its placements in mesh-dim order, as a vector of global
      indices per tensor dim: ``Shard(d)`` on a mesh dim of size n gives coordinate c the c-th of n
      chunks of ``ceil(L / n)`` (``torch.chunk``'s split, as FSDP2 and DTensor use; trailing chunks
      may be empty); ``_StridedShard(d, split_factor=sf)`` (FSDP on "dp" over TP's ``Shard(d)`` on
      "tp", written left to right) cuts the vector in sf chunks, each in n, and gives coordinate c
      the c-th piece of every one. Contiguous results become ``(start, length)``; the shape is
      checked against the local tensor's. ``Replicate`` copies (HSDP's replica dim, TP's replicated
      bias) add up once: only the copy at coordinate 0 enters the sums, but every copy is updated.
      ``Partial`` and other placements are refused with a :class:`ShardingError` naming the
      parameter, the placement and its mesh dim.
    * 2-D meshes: the sums are reduced over the union of the row tensors' mesh ranks (the whole
      2-D mesh). A tensor on a 1-D submesh (FSDP on ``mesh["dp"]`` over a layer TP left plain) has
      identical copies on the sibling submeshes: only the submesh holding the first of those ranks
      contributes; a plain tensor contributes on the first rank only.
    * The layouts are ``kernels.build_layout(..., partial=True)`` over the local shapes: positions
      held by another rank are -1, row lengths are the whole rows'. The global layout is built once
      on the CPU to validate the groups (so a bad group fails on every rank alike).
    * The all-reduce runs over those ranks (the default group when they span the world; else a 1-D
      mesh's group, or a group made once per set of ranks among them). NB: collectives need every
      rank: ``opt.group_sparsity``, ``opt.status()`` and ``opt.row_stats()`` reduce too, so call
      them on every rank.
    * A step's finite-gradient flag is reduced (max, :func:`reduce_flag`, the optimizers' only flag
      reduction) over every DTensor parameter's ranks before anything changes, since one rank's
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


def _chunks(held: torch.Tensor, n: int) -> list:
    """``held`` in ``n`` pieces as ``torch.chunk`` splits it (pieces of ``ceil(len / n)``; the trailing
    ones may be empty), always ``n`` of them."""
    per = -(-held.numel() // n) if held.numel() else 0
    return [held[min(c * per, held.numel()):min((c + 1) * per, held.numel())] for c in range(n)]


def _placement_kind(p):
    """``("strided", dim, split_factor)``, ``("shard", dim, 1)``, ``("replicate", None, 1)`` or None."""
    from torch.distributed.tensor.placement_types import Shard

    sf = getattr(p, "split_factor", None)  # FSDP over TP: _StridedShard (a Shard subclass in older torch)
    if sf is not None and hasattr(p, "dim"):
        return "strided", p.dim, int(sf)
    if isinstance(p, Shard):
        return "shard", p.dim, 1
    if p.is_replicate():
        return "replicate", None, 1
    return None


def _local_ranges(t, name: str):
    """``(held, contributes)``: per dim, the positions of ``t``'s local shard in the whole tensor
    (``(start, length)`` when contiguous, else a LongTensor of global indices in local order), and
    whether this copy enters the row sums within its mesh (see the module docstring)."""
    shape = tuple(t.shape)
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ShardingError(f"parameter {name!r}: this rank is not in its device mesh; build the optimizer on the "
                            "mesh's ranks only")
    held = [torch.arange(s) for s in shape]
    contributes = True
    for i, p in enumerate(t.placements):
        kind = _placement_kind(p)
        if kind is None:
            dim_name = f" ({mesh.mesh_dim_names[i]!r})" if mesh.mesh_dim_names else ""
            raise ShardingError(f"parameter {name!r} has placement {p!r} on mesh dim {i}{dim_name}: DHSPG/HESSO take "
                                "parameters sharded with Shard(dim) or _StridedShard(dim) (fully_shard, "
                                "ColwiseParallel/RowwiseParallel, FSDP over TP) or replicated (HSDP); redistribute it "
                                "to Shard or Replicate first (DTensor.redistribute)")
        what, d, sf = kind
        if what == "replicate":
            contributes = contributes and coord[i] == 0
            continue
        d = d % len(shape)
        n = mesh.size(i)
        if what == "shard":
            held[d] = _chunks(held[d], n)[coord[i]]
        else:  # right-to-left sharding written left to right: sf pieces, each in n; piece c of every one
            held[d] = torch.cat([_chunks(piece, n)[coord[i]] for piece in _chunks(held[d], sf)])
    want = tuple(h.numel() for h in held)
    got = tuple(t.to_local().shape)
    if want != got:
        raise ShardingError(f"parameter {name!r}: its local shard has shape {got}, but its placements "
                            f"{tuple(t.placements)} give {want} (torch.chunk's split): uneven custom shardings are "
                            "not understood")
    out = []
    for h in held:
        lo = int(h[0]) if h.numel() else 0
        contiguous = h.numel() == 0 or bool(torch.equal(h, torch.arange(lo, lo + h.numel())))
        out.append((lo, h.numel()) if contiguous else h)
    return tuple(out), contributes


def _length(r) -> int:
    return r[1] if isinstance(r, tuple) else r.numel()


def restrict(entries_of, ranges, include=None):
    """Row entries ``(rows, [(tensor, dim, index[rows, k])])`` over whole tensors, restricted to the
    local shards ``ranges[tensor][dim]``: ``(start, length)``, or a LongTensor of the global indices
    held, in local order (strided shards). Positions inside become local, the others -1
    (``kernels.build_layout(..., partial=True)``); ``include[tensor]`` False drops a tensor's entries
    (a replica that does not enter the sums)."""
    out = []
    for rows, entries in entries_of:
        loc = []
        for t, dim, idx in entries:
            if include is not None and not include[t]:
                continue
            dim = dim % len(ranges[t])
            r = ranges[t][dim]
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(int(rows), -1)
            if isinstance(r, tuple):
                start, length = r
                inside = (idx >= start) & (idx < start + length)
                loc.append((t, dim, torch.where(inside, idx - start, torch.full_like(idx, -1))))
                continue
            held = torch.as_tensor(r, dtype=torch.long)
            inv = torch.full((max(int(idx.max()) + 1 if idx.numel() else 0, int(held.max()) + 1 if held.numel()
                                  else 0),), -1, dtype=torch.long)  # global position -> local (-1: elsewhere)
            inv[held] = torch.arange(held.numel())
            loc.append((t, dim, inv[idx]))
        out.append((rows, loc))
    return out


_GROUPS: dict = {}  # ranks -> (default group, process group): one per set of ranks (each is a communicator)


def mesh_ranks(mesh) -> tuple:
    """The global ranks of ``mesh``, sorted."""
    return tuple(sorted(int(r) for r in mesh.mesh.flatten().tolist()))


def reduction_ranks(tensors) -> tuple:
    """The ranks whose shards of ``tensors`` (DTensors, possibly on several meshes) add up to whole rows:
    the union of their meshes' ranks on this rank. A tensor on a smaller mesh (a 1-D submesh of the
    2-D mesh: FSDP on ``mesh["dp"]`` over a parameter that TP left plain) has its copies on the
    sibling submeshes, which hold the other ranks."""
    ranks = set()
    for t in tensors:
        if is_dtensor(t):
            ranks.update(mesh_ranks(t.device_mesh))
    return tuple(sorted(ranks))


def ranks_group(ranks: tuple, meshes=()):
    """A process group over ``ranks`` (None: the default group), made once per set of ranks: a
    1-D mesh's own group when one of ``meshes`` spans them, else ``dist.new_group`` among those
    ranks only (``use_local_synchronization``: the other ranks do not take part)."""
    ranks = tuple(ranks)
    if ranks == tuple(range(dist.get_world_size())):
        return None
    for m in meshes:
        if m.ndim == 1 and mesh_ranks(m) == ranks:
            return m.get_group()
    world, group = _GROUPS.get(ranks, (None, None))
    if world is not dist.group.WORLD:  # NB: a group made before the default group was re-initialised is dead
        group = dist.new_group(list(ranks), use_local_synchronization=True)
        _GROUPS[ranks] = (dist.group.WORLD, group)
    return group


def tensors_group(tensors):
    """The process group over :func:`reduction_ranks` of ``tensors``."""
    return ranks_group(reduction_ranks(tensors), tuple({id(t.device_mesh): t.device_mesh for t in tensors
                                                         if is_dtensor(t)}.values()))


def reduce_flag(flag: torch.Tensor, group=None) -> torch.Tensor:
    """A copy of ``flag`` all-reduced with max over ``group``: a skip flag set on any rank is set on
    every rank (the one flag reduction of the optimizers, sharded rows or not)."""
    flag = flag.clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


class Shards:
    """The local slices of an optimizer's row tensors and the reduction of per-row sums across ranks."""

    def __init__(self, tensors, names):
        ranks = reduction_ranks(tensors)
        meshes = {}
        for t, name in zip(tensors, names):
            if is_dtensor(t):
                mr = mesh_ranks(t.device_mesh)
                if len(ranks) % len(mr):
                    raise ShardingError(f"parameter {name!r} lives on a device mesh of ranks {list(mr)}, which does "
                                        f"not tile the ranks {list(ranks)} of the other row parameters' meshes: "
                                        "shard the model on one DeviceMesh and its submeshes")
                meshes[id(t.device_mesh)] = t.device_mesh
        self.group = ranks_group(ranks, tuple(meshes.values()))
        self.ranks = ranks
        me = dist.get_rank()
        self.ranges, self.contributes = [], []
        # NB: a shard's shape can disagree with its placements on some ranks only (uneven FSDP over
        # TP); a rank that raised alone would leave the others waiting in their next collective, so
        # the ranks agree on failure (one max all-reduce) and every rank raises.
        error = None
        try:
            for t, name in zip(tensors, names):
                if is_dtensor(t):
                    r, c = _local_ranges(t, name)
                    # a submesh's copy counts on the submesh that holds the first rank (its siblings: replicas)
                    c = c and ranks[0] in mesh_ranks(t.device_mesh)
                else:
                    r, c = tuple((0, s) for s in t.shape), me == ranks[0]  # a plain tensor: the same on every rank
                self.ranges.append(r)
                self.contributes.append(c)
        except ShardingError as e:
            error = e
        if ranks:
            device = next(local(t).device for t in tensors if is_dtensor(t))
            failed = reduce_flag(torch.tensor([0.0 if error is None else 1.0], device=device), self.group)
            if error is None and bool(failed.item()):
                raise ShardingError(f"rank {me}: another rank of {list(ranks)} cannot read its shard of a row "
                                    "parameter (its error names the parameter); every rank stops here")
        if error is not None:
            raise error
        self.global_shapes = tuple(torch.Size(t.shape) for t in tensors)
        self.local_shapes = tuple(torch.Size(_length(x) for x in r) for r in self.ranges)

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
        """A skip flag set on any rank is set on every rank (max): :func:`reduce_flag` over the rows' ranks."""
        return reduce_flag(flag, self.group)


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
