"""RowLayout: where the elements of every ZIG row live, computed once when an optimizer is built.

A row owns, for each ``(tensor, dim, position)`` entry, the slab ``tensor.movedim(dim, 0)[position]``.
Two descriptions of the same sets are kept, one per consumer:

* **Axes** (torch reference, Triton write-back): for every ``(tensor, dim)`` that any row touches, a
  position -> row table ``pos_row`` (``n_rows`` = "no row", a sentinel). An element's rows are the
  rows of its positions along each of its tensor's axes, so per-element quantities are broadcasts of
  small per-position vectors and nothing of the tensors' size is stored.
* **Segments** (Triton reductions): the slabs of row r are segments ``seg_ptr[r]:seg_ptr[r+1]``, each
  ``(tensor, base, outer, outer_stride, inner)``; element t of a segment is at flat offset
  ``base + (t // inner) * outer_stride + t % inner`` of a contiguous tensor.

Internals:
    * Built with vectorised torch ops: one loop over the entries (parameter slices of a group),
      none over rows.
    * # NB: the layout validates that no ``(tensor, dim, position)`` is owned twice; an element may
      still be in several rows along *different* dims (conv2.weight[o, i] is in conv2's row o and in
      conv1's row i).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from otofx.errors import OTOError

APPLY_BLOCK = 1024  # elements per program of the Triton write-back kernel (its block table uses it)
MAX_AXES = 4  # row axes per tensor the Triton write-back supports (ZIGs use at most 2 in practice)


class LayoutError(OTOError):
    """The groups do not describe a valid row layout over the given tensors."""


@dataclass(frozen=True)
class Axis:
    """Rows along one axis of one tensor: ``pos_row[j]`` is the row owning position j (n_rows: none)."""

    tensor: int
    dim: int
    pos_row: torch.Tensor  # long [shape[dim]]
    pos: torch.Tensor  # long: the owned positions
    row: torch.Tensor  # long: their rows


@dataclass(frozen=True)
class RowLayout:
    """The rows of all groups over ``len(shapes)`` tensors (see the module docstring)."""

    shapes: tuple
    n_rows: int
    group_start: tuple  # row offset of each group, plus the total
    row_group: torch.Tensor  # long [N]
    row_len: torch.Tensor  # float64 [N]: elements per row (a shared element counts in each of its rows)
    axes: tuple  # Axis, ordered by tensor then dim
    tensor_axes: tuple  # per tensor: indices into ``axes``
    # Triton tables (int64, on ``device``)
    seg_ptr: torch.Tensor = field(repr=False)  # [N + 1]
    segs: torch.Tensor = field(repr=False)  # [S, 5]: tensor, base, outer, outer_stride, inner
    axis_table: torch.Tensor = field(repr=False)  # [T, MAX_AXES, 3]: inner, size (0: unused), offset
    pos_row_flat: torch.Tensor = field(repr=False)  # every axis's pos_row, concatenated
    blocks: torch.Tensor = field(repr=False)  # [B, 2]: tensor, first flat offset (APPLY_BLOCK each)
    numels: torch.Tensor = field(repr=False)  # [T]
    # torch reference / CPU kernel views (plain Python, fixed with the layout)
    views: tuple = field(repr=False, default=())  # per tensor: canonical shape, see canonical_view
    pos_offsets: tuple = field(repr=False, default=())  # per axis: its offset into pos_row_flat
    cache: dict = field(repr=False, compare=False, default_factory=dict)  # per-backend buffers, built on use

    @property
    def n_groups(self) -> int:
        return len(self.group_start) - 1

    @property
    def device(self) -> torch.device:
        return self.row_len.device


_CONTIGUOUS = torch.Tensor.is_contiguous


def uniform(ts) -> bool:
    """Whether the tensors ``ts`` (a non-empty list) share one device and one dtype and are all
    contiguous: what the fused kernels need. # NB: one C++ grouping and one ``map``, about half the
    cost of a Python loop over the attributes; the optimizer asks this every step."""
    return len(torch._C._group_tensors_by_device_and_dtype([list(ts)], False)) == 1 and all(map(_CONTIGUOUS, ts))


def canonical_view(shape, dims) -> tuple:
    """``shape`` with its row axes ``dims`` (sorted) kept and the dims between them collapsed.

    ``(A, S1, C)`` for one axis, ``(A, S1, B, S2, C)`` for two, and so on: ``S_j`` the row axes'
    sizes, the others products of the dims around them (1 when empty); ``()`` when ``dims`` is empty.
    Every view of a contiguous tensor to this shape is free.
    """
    if not dims:
        return ()
    out, prev = [], 0
    for d in dims:
        n = 1
        for s in shape[prev:d]:
            n *= s
        out += [n, shape[d]]
        prev = d + 1
    n = 1
    for s in shape[prev:]:
        n *= s
    return tuple(out + [n])


def build_layout(shapes, groups, device="cpu", *, partial: bool = False, row_len=None) -> RowLayout:
    """The layout of ``groups`` over tensors of ``shapes``.

    ``groups``: a sequence of ``(rows, entries)``; each entry ``(tensor, dim, index)`` with ``tensor``
    an index into ``shapes`` and ``index`` a LongTensor ``[rows, k]``: row i owns positions ``index[i]``
    along ``dim`` (OTO's ZIG contract). Raises :class:`LayoutError` on an invalid description.

    ``partial=True`` (a shard's layout, see ``otofx.distributed``): ``index`` entries of -1 own
    nothing (a row's positions held by another rank) and a row may own no element here; ``row_len``
    (float64 ``[N]``, the rows' lengths in the whole tensors) then replaces the local counts.
    """
    shapes = tuple(torch.Size(s) for s in shapes)
    given_len = row_len
    starts, total = [0], 0
    owned: dict = {}  # (tensor, dim) -> (positions, rows) chunks
    row_len = []
    seg_parts = []
    for g, (rows, entries) in enumerate(groups):
        rows = int(rows)
        length = torch.zeros(rows, dtype=torch.float64)
        for t, dim, index in entries:
            if not 0 <= t < len(shapes):
                raise LayoutError(f"group {g}: tensor index {t} out of range ({len(shapes)} tensors)")
            shape = shapes[t]
            if not -len(shape) <= dim < len(shape):
                raise LayoutError(f"group {g}: dim {dim} out of range for a tensor of shape {tuple(shape)}")
            dim = dim % len(shape)
            index = torch.as_tensor(index, dtype=torch.long).reshape(rows, -1)
            size = shape[dim]
            if index.numel() and (int(index.min()) < (-1 if partial else 0) or int(index.max()) >= size):
                raise LayoutError(f"group {g}: position out of range along dim {dim} of a tensor of shape {tuple(shape)}")
            inner = 1
            for s in shape[dim + 1:]:
                inner *= s
            outer = shape.numel() // (size * inner) if size * inner else 0
            k = index.shape[1]
            row_ids = torch.arange(total, total + rows).repeat_interleave(k)
            pos = index.reshape(-1)
            if partial:
                valid = index >= 0
                length += valid.sum(1).to(torch.float64) * (outer * inner)
                row_ids, pos = row_ids[valid.reshape(-1)], pos[valid.reshape(-1)]
            else:
                length += k * outer * inner
            owned.setdefault((t, dim), []).append((pos, row_ids))
            seg = torch.stack([torch.full_like(pos, t), pos * inner, torch.full_like(pos, outer),
                               torch.full_like(pos, size * inner), torch.full_like(pos, inner)], 1)
            seg_parts.append((row_ids, seg))
        if rows and not partial and bool((length == 0).any()):
            raise LayoutError(f"group {g}: a row owns no parameter elements")
        row_len.append(length)
        total += rows
        starts.append(total)
    n = total
    row_group = torch.repeat_interleave(torch.arange(len(starts) - 1), torch.tensor(starts[1:], dtype=torch.long) - torch.tensor(starts[:-1], dtype=torch.long))

    axes, tensor_axes = [], [[] for _ in shapes]
    for (t, dim) in sorted(owned):
        pos = torch.cat([p for p, _ in owned[(t, dim)]])
        row = torch.cat([r for _, r in owned[(t, dim)]])
        size = shapes[t][dim]
        if pos.numel() and int(torch.bincount(pos, minlength=size).max()) > 1:
            raise LayoutError(f"tensor {t}, dim {dim}: a position is owned by two rows (ZIG slices must not overlap)")
        pos_row = torch.full((size,), n, dtype=torch.long)
        pos_row[pos] = row
        tensor_axes[t].append(len(axes))
        axes.append(Axis(t, dim, pos_row, pos, row))
    if any(len(a) > MAX_AXES for a in tensor_axes):
        raise LayoutError(f"a tensor has rows along more than {MAX_AXES} axes")

    # segments sorted by row (stable: entry order within a row)
    if seg_parts:
        seg_row = torch.cat([r for r, _ in seg_parts])
        segs = torch.cat([s for _, s in seg_parts]).reshape(-1, 5)
        order = torch.sort(seg_row, stable=True).indices
        segs = segs[order]
        seg_ptr = torch.zeros(n + 1, dtype=torch.long)
        seg_ptr[1:] = torch.cumsum(torch.bincount(seg_row, minlength=n), 0)
    else:
        segs = torch.zeros((0, 5), dtype=torch.long)
        seg_ptr = torch.zeros(n + 1, dtype=torch.long)

    axis_table = torch.zeros((len(shapes), MAX_AXES, 3), dtype=torch.long)
    flat, offset, pos_offsets = [], 0, [0] * len(axes)
    for t, ids in enumerate(tensor_axes):
        for j, a in enumerate(ids):
            ax = axes[a]
            inner = 1
            for s in shapes[t][ax.dim + 1:]:
                inner *= s
            axis_table[t, j] = torch.tensor([inner, shapes[t][ax.dim], offset])
            pos_offsets[a] = offset
            flat.append(ax.pos_row)
            offset += ax.pos_row.numel()
    pos_row_flat = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.long)
    numels = torch.tensor([s.numel() for s in shapes], dtype=torch.long)
    blk = [torch.stack([torch.full(((s.numel() + APPLY_BLOCK - 1) // APPLY_BLOCK,), t, dtype=torch.long),
                        torch.arange(0, s.numel(), APPLY_BLOCK)], 1) for t, s in enumerate(shapes)]
    blocks = torch.cat(blk) if blk else torch.zeros((0, 2), dtype=torch.long)

    dev = torch.device(device)
    to = lambda x: x.to(dev)  # noqa: E731
    return RowLayout(
        shapes=shapes, n_rows=n, group_start=tuple(starts), row_group=to(row_group),
        row_len=to(torch.as_tensor(given_len, dtype=torch.float64).reshape(n) if partial and given_len is not None
                   else torch.cat(row_len) if row_len else torch.zeros(0, dtype=torch.float64)),
        axes=tuple(Axis(a.tensor, a.dim, to(a.pos_row), to(a.pos), to(a.row)) for a in axes),
        tensor_axes=tuple(tuple(a) for a in tensor_axes),
        seg_ptr=to(seg_ptr), segs=to(segs.contiguous()), axis_table=to(axis_table), pos_row_flat=to(pos_row_flat),
        blocks=to(blocks.contiguous()), numels=to(numels),
        views=tuple(canonical_view(shapes[t], [axes[a].dim for a in ids]) for t, ids in enumerate(tensor_axes)),
        pos_offsets=tuple(pos_offsets),
    )
