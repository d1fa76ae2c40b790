"""Channel labels: the abstract values that the group analysis propagates through a graph.

Every tensor value in the graph gets an :class:`AxisLabels`: for each axis, an array of channel ids (one
per index along that axis) and a mask telling which indices are certainly zero when their row is zero
(and, where a rule says so, a mask of those that are then a constant, zero or not: ``const``).
Ids live in one :class:`~otofx.passes.unionfind.UnionFind`; operator rules merge them, and the
classes that remain are the rows of the zero-invariant groups.

Internals:
    * An axis whose ids are all ``PIN`` (id 0) cannot shrink: model inputs, spatial axes, anything
      an unknown op touched. Merging a real channel with a ``PIN`` index pins that channel.
    * Parameters and buffers get fresh ids on every axis of size > 1 the first time a rule reads
      them, with an :class:`Owner` record per axis; a parameter read twice (tied weights, a layer
      called twice) reuses its ids, so every use is merged automatically.
    * Python values stay python values, except sizes read off a labelled axis, which become
      :class:`SymSize` so that a later unknown use of the number can pin the axis it measures.
    * ``const`` is opt-in: a rule that builds a label without it says nothing beyond ``zero`` (a zero
      slice is constant), so a rule that does not know about constants loses rows, never exactness.
      Parameters and buffers are constant on every axis; the rules that pass constants on are the
      permutes, reshapes, splits, slices, concat, linear and pointwise conv layers, elementwise ops
      (dropout with p > 0 stops them), binary ops with parameters or numbers, and reductions over other axes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx as fx

from .nodes import get_path, module_tensors
from .unionfind import PIN, UnionFind, unique


@dataclass(frozen=True)
class AxisLabels:
    """Per-axis channel ids and zero masks of one tensor value."""

    ids: tuple  # tuple[np.ndarray[int64], ...], one per axis
    zero: tuple  # tuple[np.ndarray[bool], ...]
    # per axis, where a rule said so: index i's slice is the same for every input when its row is zero
    # (a constant, not necessarily 0: MLP-Mixer's token MLP writes fc2(act(b1)) + b2 into a zero
    # channel); None: no rule said, read as ``zero`` (a zero slice is constant)
    const: tuple | None = None

    @property
    def ndim(self) -> int:
        return len(self.ids)

    def fixed(self, d: int) -> np.ndarray:
        """Axis ``d``'s mask of indices whose slice is constant (zero or not) when their row is zero."""
        return self.zero[d] if self.const is None else self.const[d] | self.zero[d]

    def consts(self) -> tuple | None:
        """Every axis's :meth:`fixed` mask, or None when it is just ``zero``."""
        return None if self.const is None else tuple(self.fixed(d) for d in range(self.ndim))

    @functools.cached_property
    def shape(self) -> tuple:  # NB: cached in the instance dict (a frozen dataclass allows it)
        return tuple(len(a) for a in self.ids)

    def axis(self, d: int) -> tuple:
        return self.ids[d], self.zero[d]

    def with_axis(self, d: int, ids: np.ndarray, zero: np.ndarray, const: np.ndarray | None = None) -> "AxisLabels":
        """Axis ``d`` replaced. The other axes' ``const`` masks stay only when ``const`` (axis d's) is
        given: the caller says the op takes slices along them as they are (a split, a concat).

        # NB: a rule that passes zeros along an axis need not pass constants (a matmul maps a zero row
        # of one operand to zero, a constant one to constant @ other): dropped unless asked for
        """
        i = list(self.ids)
        z = list(self.zero)
        i[d], z[d] = ids, zero
        if const is None:
            return AxisLabels(tuple(i), tuple(z))
        c = list(self.consts() or self.zero)
        c[d] = const
        return AxisLabels(tuple(i), tuple(z), tuple(c))


@dataclass(frozen=True)
class ParamRef:
    """A module's parameter or buffer by qualified name (module forms bind these; ``Ctx.param`` reads them)."""

    name: str


@dataclass(frozen=True)
class WeightNormRef:
    """A weight that weight norm computes from two parameters: ``W = g * v / ||v||``, the norm over
    every axis of ``v`` but ``dim`` (over all of them when ``dim`` is None); ``g`` has ``v``'s shape
    with size 1 on every other axis (a 0-d tensor when ``dim`` is None). ``g`` and ``v`` are
    qualified parameter names; ``how`` names the API that registered it (for messages)."""

    g: str
    v: str
    dim: int | None
    how: str = "torch.nn.utils.parametrizations.weight_norm"


@dataclass(frozen=True)
class SymSize:
    """An int read off the shape of a value; ``ids`` are the ids of the axes it measures."""

    value: Any
    ids: tuple = ()


class Owner(NamedTuple):
    """Axis ``dim`` of parameter/buffer ``name`` has one channel id per index: ``ids``.

    # NB: a NamedTuple, not a frozen dataclass: one is made per parameter axis, and a frozen
    # dataclass's __init__ costs several times more
    """

    name: str
    dim: int
    ids: np.ndarray
    is_param: bool


@dataclass(frozen=True)
class Pin:
    node: str
    op: str
    reason: str
    channels: int  # how many channel classes this pin took out of play


PINNED = "pinned"  # marker for Ctx.tensor_lab: this axis of the tensor is not a channel
OWN = "own"  # marker for Ctx.tensor_lab: this axis is a channel the parameter creates, whatever its size


@functools.lru_cache(maxsize=4096)
def pinned_axis(n: int) -> np.ndarray:
    """An axis that is not a channel: all ids PIN (shared, read-only: label arrays are never written)."""
    a = np.zeros(n, dtype=np.int64)
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=4096)
def false_mask(n: int) -> np.ndarray:
    a = np.zeros(n, dtype=bool)
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=4096)
def true_mask(n: int) -> np.ndarray:
    """All indices zero with their row (a parameter's own axis); shared and read-only like the others."""
    a = np.ones(n, dtype=bool)
    a.flags.writeable = False
    return a


@dataclass
class Ctx:
    """Mutable state of one analysis run (internal to find_zigs)."""

    root: torch.nn.Module
    uf: UnionFind = field(default_factory=UnionFind)
    owners: list = field(default_factory=list)
    pins: list = field(default_factory=list)
    tensor_labs: dict = field(default_factory=dict)  # qualified name -> AxisLabels
    node: fx.Node | None = None
    op: str = ""
    alias: dict = field(default_factory=dict)  # any name of a tensor -> its first name
    tensors: dict = field(default_factory=dict)  # first name -> parameter or buffer
    row_axes: dict = field(default_factory=dict)  # reshape node name -> output axes preferred as rows
    # reshape nodes whose merge of several channel axes keeps the innermost one as rows (the outermost
    # by default), and every such merge made: (node name, ids of the axis kept)
    merge_inner: frozenset = frozenset()
    merges: list = field(default_factory=list)
    # reshapes that tied channels merged with a token or pixel axis in blocks read at the example's
    # sizes (which may differ at another size): (node name, ids of the channel axis)
    sized_ties: list = field(default_factory=list)
    extra_labels: dict = field(default_factory=dict)  # "<node>.<what>" -> ids a rule's fix needs later
    weight_norms: list = field(default_factory=list)  # every WeightNormRef a rule read (the rewrite refits g)
    # (ids, node, op, reason): pinned at the end of the analysis unless every live row among the ids
    # holds several of them (see Ctx.pin_unless_blocks)
    deferred: list = field(default_factory=list)
    # node name -> last-axis mask of the channels a layer norm reads that are a constant other than 0
    # when their row is zero: the rewrite fills their values back into its mean and variance
    fills: dict = field(default_factory=dict)
    # the mean nodes of layer norms written out (passes.nodes.layer_norm_of) whose input's channels are zero
    # with their rows: their variance's mean of squares is free too (its input, x - u, is not zero there)
    centred: set = field(default_factory=set)

    modules: dict = field(default_factory=dict)  # every qualified name (aliases too) -> module
    _tensor_lab_ids: set = field(default_factory=set)  # id() of every tensor_labs value

    def __post_init__(self):
        first: dict[int, str] = {}
        # NB: parameters before buffers, each in named_parameters' order, so a tensor's first name is
        # the one torch gives it
        self.modules, params, buffers = module_tensors(self.root)
        for name, t in params + buffers:
            self.alias[name] = first.setdefault(id(t), name)
            self.tensors.setdefault(self.alias[name], t)

    # -- constructors -------------------------------------------------------------------------
    def pinned_lab(self, shape) -> AxisLabels:
        shape = tuple(map(int, shape))
        return AxisLabels(tuple(pinned_axis(n) for n in shape), tuple(false_mask(n) for n in shape))

    def fresh(self, n: int) -> np.ndarray:
        return self.uf.new(n)

    def tensor_lab(self, name: str, given: dict | None = None, zeroable=None) -> AxisLabels:
        """AxisLabels of parameter/buffer ``name``.

        The first read creates it: axis d takes ``given[d]`` when that is an id array of the
        axis' length (the channel it is owned by, no union needed) or ``PINNED`` (not a channel),
        and fresh owned ids otherwise (size-1 axes are pinned). Later reads tie ``given`` to it.
        ``zeroable``: the axes whose slices training may zero with their row (default: every axis
        of a parameter, none of a buffer); the others are sliced with the row but not part of it.
        """
        name = self.alias.get(name, name)
        lab = self.tensor_labs.get(name)
        given = given or {}
        if lab is not None:
            return self._apply_given(lab, given)
        t = self._tensor(name)
        param = isinstance(t, torch.nn.Parameter)
        ids, zeros = [], []
        for d, n in enumerate(t.shape):
            a = given.get(d)
            # a size-1 axis may broadcast (PReLU(1), a [C, 1, 1] scale): it is a channel only when the
            # rule says the tensor owns it, or ties it to an axis of the same size
            if a is PINNED or (n == 1 and a is not OWN and (a is None or len(a) != 1)):
                ids.append(pinned_axis(n))
                zeros.append(false_mask(n))
                continue
            if a is None or a is OWN or len(a) != n:
                a = self.fresh(n)
            is_param = param and (zeroable is None or d in zeroable)
            self.owners.append(Owner(name, d, a, is_param))
            ids.append(a)
            # zeroing a row zeroes its parameters, never a buffer
            zeros.append(true_mask(n) if is_param else false_mask(n))
        # a parameter or buffer is the same for every input: each of its slices is a constant
        lab = AxisLabels(tuple(ids), tuple(zeros), tuple(true_mask(n) for n in t.shape))
        self.tensor_labs[name] = lab
        self._tensor_lab_ids.add(id(lab))
        return lab

    def is_tensor_lab(self, lab) -> bool:
        """Whether ``lab`` is the label of a parameter or buffer as it is (the same for every input)."""
        return id(lab) in self._tensor_lab_ids

    def shape_of(self, p) -> tuple:
        if isinstance(p, AxisLabels):
            return p.shape
        if isinstance(p, WeightNormRef):
            p = ParamRef(p.v)
        return tuple(self._tensor(self.alias.get(p.name, p.name)).shape)

    def param(self, p, given: dict | None = None, out: int | None = None) -> AxisLabels | None:
        """A parameter argument (a ParamRef, a WeightNormRef, an AxisLabels, or None) as an AxisLabels;
        ``out``: the axis whose channel the layer creates (read for a WeightNormRef only)."""
        if p is None:
            return None
        if isinstance(p, AxisLabels):
            return self._apply_given(p, given or {})
        if isinstance(p, WeightNormRef):
            return self.weight_norm_lab(p, given or {}, out)
        return self.tensor_lab(p.name, given)

    def weight_norm_lab(self, ref: WeightNormRef, given: dict, out: int | None) -> AxisLabels:
        """The labels of a weight-normed weight ``g * v / ||v||`` (``given`` as for a plain weight;
        ``out``: the axis whose channel the layer creates, so that a zero slice there is a zero output).

        Axis ``dim`` belongs to ``g`` (zeroable: ``g_i = 0`` zeroes slice i of W). ``v`` is sliced with
        every row but zeroable only along ``out`` when that is not ``dim`` (then slice o of W is zero
        exactly when v's is). The label's zero mask is false along the other axes of ``v``: a layer
        must then see its input zero there (``conv``/``linear`` check it), and the rewrite rescales
        ``g`` by the norm ``v`` keeps (:mod:`otofx.passes.weightnorm`).

        # NB: never zero v along ``dim``: v_i = 0 makes row i 0/0 = NaN
        """
        d = ref.dim
        shape = self.shape_of(ParamRef(ref.v))
        if d is not None:
            gl = self.tensor_lab(ref.g, {a: (given.get(d, OWN) if a == d else PINNED) for a in range(len(shape))})
            pinned = gl.ids[d] is pinned_axis(shape[d])
            vgiven = {**given, d: PINNED if pinned else gl.ids[d]}
        else:
            gl = self.tensor_lab(ref.g, {})
            vgiven = dict(given)
        zeroable = {out} if out is not None and out != d else set()
        vl = self.tensor_lab(ref.v, vgiven, zeroable=zeroable)
        named = WeightNormRef(self.alias.get(ref.g, ref.g), self.alias.get(ref.v, ref.v), d, ref.how)
        if named not in self.weight_norms:
            self.weight_norms.append(named)
        if d is None:
            return vl
        return vl.with_axis(d, gl.ids[d], gl.zero[d])

    def _apply_given(self, lab: AxisLabels, given: dict) -> AxisLabels:
        """Tie (or pin) the axes of an existing tensor label as ``given`` says."""
        for d, a in given.items():
            if a is PINNED:
                self.uf.pin(lab.ids[d])
            elif a is not OWN and len(a) == lab.shape[d]:
                self.tie(lab.ids[d], a)
        return lab

    def _tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name] if name in self.tensors else get_path(self.root, name)

    # -- merging ------------------------------------------------------------------------------
    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        # NB: an axis tied to one that is no channel (a constant's, a table computed in forward, an input's)
        # is pinned by the union: said as a pin, so that the report names where its channels went
        pa, pb = a.size and a is pinned_axis(a.size), b.size and b is pinned_axis(b.size)
        if pa != pb:
            self.pin(b if pa else a, "combined with an axis that is not a channel (a constant, an input, a "
                                     "table computed in forward)")
            return
        self.uf.union(a, b)

    def pin_unless_blocks(self, ids: np.ndarray, reason: str) -> None:
        """Pin ``ids`` at the end of the analysis unless each of their live rows spans several of
        them (whole heads of head_dim positions); see ``finish_deferred``."""
        name = self.node.name if self.node is not None else "<graph>"
        self.deferred.append((ids, name, self.op, reason))

    def finish_deferred(self) -> None:
        for ids, name, op, reason in self.deferred:
            roots = self.uf.find(ids)
            live = roots[roots != PIN]
            if live.size == 0:
                continue
            _, counts = unique(live, return_counts=True)
            if (counts > 1).all():
                continue
            node, self.node = self.node, None
            self.uf.pin(unique(live))
            self.pins.append(Pin(name, op, reason, int(unique(live).size)))
            self.node = node

    def pin(self, ids, reason: str) -> None:
        """Pin ``ids`` (an array, a AxisLabels, a SymSize or a container of them) and record why."""
        # NB: spatial and input axes are the one cached all-PIN array of their length: skipped
        # (a bare array, the common call from the rules, without the generator walk)
        found = (ids,) if isinstance(ids, np.ndarray) else _id_arrays(ids)
        arrays = [a for a in found if a.size and a is not pinned_axis(a.size)]
        if not arrays:
            return
        flat = np.concatenate(arrays)
        roots = self.uf.find(flat)
        live = unique(roots[roots != PIN])
        if live.size == 0:
            return
        self.uf.pin(live)
        name = self.node.name if self.node is not None else "<graph>"
        self.pins.append(Pin(name, self.op, reason, int(live.size)))


def leaves(x) -> list:
    """Every non-container value inside a nested list/tuple/dict structure, in order.

    # NB: a stack, not nested generators: find_zigs flattens every node's arguments with it
    """
    out, todo = [], [x]
    while todo:
        v = todo.pop()
        if isinstance(v, (list, tuple)):
            todo += reversed(v)
        elif isinstance(v, dict):
            todo += reversed(v.values())
        else:
            out.append(v)
    return out


def _id_arrays(x):
    for v in leaves(x):
        if isinstance(v, np.ndarray):
            yield v
        elif isinstance(v, (AxisLabels, SymSize)):
            yield from v.ids


def labs_in(x):
    """Every AxisLabels inside a (nested) argument structure."""
    return (v for v in leaves(x) if isinstance(v, AxisLabels))
