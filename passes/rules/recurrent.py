"""Recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (tanh and relu) and their pruned form ``PrunedRNN``;
one step of a cell (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``, ATen's ``lstm_cell``, ``gru_cell``,
``rnn_tanh_cell``, ``rnn_relu_cell``).

A hidden unit ``j`` of one layer and one direction is a row: its rows of ``weight_ih`` and
``weight_hh`` in every gate block (LSTM i, f, g, o; GRU r, z, n; RNN one; blocks of ``hidden_size``
stacked along dim 0), its entries of ``bias_ih`` and ``bias_hh``, and the columns that read it (its
column of the same layer and direction's ``weight_hh``, of the next layer's ``weight_ih``, and of
whatever reads ``output``). With those zero and a zero initial state the unit stays zero at every
step: LSTM ``g = tanh(0) = 0`` so ``c`` stays 0 and ``h = o * tanh(c) = 0``; GRU ``n = tanh(0) = 0`` and
``h' = (1 - z) n + z h = h / 2`` stays 0; RNN ``h = act(0) = 0``. Layer 0's ``weight_ih`` columns read
the input's features (one channel each, zeroed with the producer's row).

The state (``h_n``, ``c_n``, and a given ``h0``/``c0``) is ``[layers * dirs, batch, hidden]``: one
hidden axis for every layer and direction. When the state is read or given, unit ``j`` of every
layer and direction is one row (tied: they must go together for the state to stay one tensor);
otherwise every layer and direction has its own rows, and the compressed layer (a ``PrunedRNN``
when their sizes differ) writes its state at the original width, its pruned units zero as they
were.

Internals:
    * Whether the state is read is read off the graph: the node's users other than ``getitem(., 0)``
      (``output``), through ``getitem`` chains that end unused (``out, _ = lstm(x)``).
    * A given initial state whose entry is not zero with its row (``h0`` from a constant, ``c0``) leaves
      LSTM and GRU units non-zero (``c_1 = c0 / 2``, ``h_1 = h0 / 2``): the output's features are then
      not zero with their rows (RNN units are: ``act(0 + 0)``, ``h0`` read only by the zeroed column).
    * The time axis is mixed by the recurrence (pinned); the batch axis passes.
    * ``proj_size > 0`` LSTMs (:func:`_projected`): ``h`` has ``proj_size`` entries written by
      ``weight_hr``, ``c`` has ``hidden_size``; two kinds of rows, each tied across layers and
      directions, so the stock layer is resized (no PrunedRNN).
    * Declined (pinned, with the reason): ``PackedSequence`` inputs.
    * A cell's step (``recurrent_cell``) has one slot: the units are fresh per call and tied to the
      weights' rows, so every step of a loop (a leaf called T times, or T ATen calls an export unrolled)
      is the same row; the state fed back ties its entries to them, as does a state from a layer.
      ``_cell_fix`` narrows a zero state made at the old width; the resizer reads the sizes off the weights.
    * ATen's ``lstm``/``gru``/``rnn_*`` (``input`` overloads: a graph torch.export made) are read through
      :class:`AtenRNN`, their weights the call's ``params`` (per layer and direction: w_ih, w_hh, b_ih,
      b_hh); the call runs one hidden size, so unit j is tied across layers and directions.
    * Each slot's unit ids are kept in ``ctx.extra_labels`` (``<node>.units.<slot>``) for ``_rnn_fix``,
      which resizes the stock layer (all slots keep as many units) or puts a ``PrunedRNN`` in place.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..channels import AxisLabels, Ctx, ParamRef, false_mask, pinned_axis
from ..modules import RNN_GATES, PrunedRNN, resize_stock_cell, rnn_slot_suffix, rnn_slots
from ..registry import RuleDeclined, functions, modules, rule
from ..unionfind import PIN
from .common import _out_shape, _ov

aten = torch.ops.aten


def _read_beyond(n: fx.Node) -> bool:
    """Whether ``n``'s value reaches anything but ``getitem`` chains that end unused."""
    for u in n.users:
        if not (u.op == "call_function" and u.target is operator.getitem) or _read_beyond(u):
            return True
    return False


def state_read(node: fx.Node) -> bool:
    """Whether the final state (item 1 of a recurrent layer's result) is read."""
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            if u.args[1] % 2 == 0:  # output
                continue
            if _read_beyond(u):
                return True
            continue
        return True  # the whole result escapes (returned, passed on)
    return False


def _slot_units(m: nn.Module, slots: list) -> list:
    """A PrunedRNN's original unit indices per slot (numpy)."""
    out = []
    for k, rev in slots:
        t = m.get_buffer(f"units_{rnn_slot_suffix(k, rev)}")
        if t.device.type == "meta":
            raise RuleDeclined("a PrunedRNN on the meta device: its unit indices cannot be read")
        out.append(t.cpu().numpy())
    return out


_ZEROS = ("zeros", "new_zeros", "zeros_like")


def zero_states(node: fx.Node) -> list:
    """The nodes of the initial state ``node`` (a recurrent layer's call) is given, when every one of
    them is made by ``torch.zeros`` / ``new_zeros`` / ``zeros_like`` (the tutorial's
    ``h0 = torch.zeros(layers, batch, hidden)``), ATen's or torch's, through clones and casts; else ``[]``."""
    from ..nodes import _before_casts, _op

    hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
    states = list(hx) if isinstance(hx, (tuple, list)) else [hx] if hx is not None else []
    states = [_before_casts(s) for s in states]  # NB: c0 = h0.clone() is zero too
    # NB: ATen's zeros has no rule (its op name reads "zeros.default"): the overload's name is dropped
    if not states or not all(isinstance(s, fx.Node) and s.op in ("call_function", "call_method")
                             and _op(s).split(".")[0] in _ZEROS for s in states):
        return []
    return states


def _narrow_zero_states(node: fx.Node, old: int, new: int, states=None) -> None:
    """A zero initial state made at the old width (a literal last size) is made at the new one
    (``states``: those of :func:`zero_states` to narrow, default all)."""
    from ..nodes import _op

    for z in zero_states(node) if states is None else states:
        if z.kwargs.get("size") is not None:
            continue
        # NB: x.new_zeros(size) and ATen's new_zeros(x, size): args[0] is x
        first = 1 if z.op == "call_method" or _op(z) == "new_zeros" else 0
        rest = z.args[first:]
        packed = len(rest) == 1 and isinstance(rest[0], (tuple, list))  # zeros((a, b, c)), not zeros(a, b, c)
        sizes = tuple(rest[0]) if packed else tuple(rest)
        if sizes and sizes[-1] == old:
            sizes = sizes[:-1] + (new,)
            z.args = z.args[:first] + ((sizes,) if packed else sizes)


def _narrow_projected_states(site) -> None:
    """A projected LSTM's zero ``(h0, c0)``: h0 at the new projection width, c0 at the new hidden width."""
    units, proj = (site.plan.zigset.labels.get(f"{site.node.name}.{k}.0") for k in ("units", "proj"))
    zs = zero_states(site.node)
    if units is None or proj is None or len(zs) != 2 or zs[0] is zs[1]:
        return
    for z, ids in zip(zs, (proj, units)):
        _narrow_zero_states(site.node, len(ids), int(site._keep_ids(ids).sum()), [z])


def _rnn_fix(site, input, module=None, **_):
    """Resize the stock layer when every layer and direction keeps as many units, else put a PrunedRNN
    in its place (its tensors were sliced already); a zero initial state follows the new width."""
    from ..modules import PrunedRNN, resize_stock_rnn

    m = site.module
    labels = site.plan.zigset.labels
    if f"{site.node.name}.proj.0" in labels:  # a projected LSTM: tied units, the stock layer resized
        _narrow_projected_states(site)
        if m is not None:
            resize_stock_rnn(m, [np.nonzero(site._keep_ids(labels[f"{site.node.name}.units.0"]))[0]]
                             * len(rnn_slots(m.num_layers, m.bidirectional)))
        return
    if m is None:  # ATen's call (torch.export): every layer and direction keeps as many units (tied)
        units = labels.get(f"{site.node.name}.units.0")
        if units is not None:
            _narrow_zero_states(site.node, len(units), int(site._keep_ids(units).sum()))
        return
    if isinstance(m, PrunedRNN):
        m.resync()
        return
    units = []
    for s, _ in enumerate(rnn_slots(m.num_layers, m.bidirectional)):
        ids = labels.get(f"{site.node.name}.units.{s}")
        units.append(np.nonzero(site._keep_ids(ids))[0] if ids is not None else np.arange(m.hidden_size))
    old = m.hidden_size
    if len({len(u) for u in units}) == 1:  # NB: tied units (a state was given): one width for all
        _narrow_zero_states(site.node, old, len(units[0]))
    new = resize_stock_rnn(m, units)
    if new is not None:
        parent, _, attr = site.node.target.rpartition(".")
        setattr(site.root.get_submodule(parent) if parent else site.root, attr, new)


@dataclass(frozen=True)
class AtenRNN:
    """What an ATen ``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` call says of its layer: the recurrent
    rule's view of a module, for graphs torch.export made (the weights are the call's ``params``)."""

    mode: str
    num_layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    hidden_size: int
    proj_size: int = 0


_FLAT = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # one layer and direction's tensors in ATen's params


def _aten_layer(params, has_biases: bool, num_layers: int, bidirectional: bool, batch_first: bool,
                mode: str) -> AtenRNN:
    per = 4 if has_biases else 2
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, AxisLabels) for p in params):
        raise RuleDeclined("weights that are not tensors")
    if len(params) == num_layers * (2 if bidirectional else 1) * (per + 1):  # w_hr [proj, hidden] last
        return AtenRNN(mode, num_layers, bidirectional, batch_first, has_biases, params[per].shape[1],
                       params[per].shape[0])
    return AtenRNN(mode, num_layers, bidirectional, batch_first, has_biases, params[1].shape[1])


def _slot_tensors(ctx: Ctx, kinds: tuple, slot: int, prefix: str, sfx: str, params, given: dict) -> None:
    """Label one layer and direction's tensors (``kinds``, in ATen's order) by ``given``: the module's
    ``<prefix><kind>_<sfx>``, or, for ATen's call (``params`` given), its entries of ``params``."""
    for i, kind in enumerate(kinds):
        if params is not None:
            ctx.param(params[slot * len(kinds) + i], given[kind])
        else:
            ctx.tensor_lab(f"{prefix}{kind}_{sfx}", given[kind])


@rule("recurrent", fix=_rnn_fix)
def recurrent(ctx: Ctx, input, hx=None, module=None, params=None, has_biases=True, num_layers=1,
              bidirectional=False, batch_first=False, mode=None, meta=None, **_):
    """LSTM/GRU/RNN: hidden unit j of one layer and direction is a channel (its rows of weight_ih, weight_hh and biases in every gate block; its weight_hh column and the next layer's weight_ih column read it); layer 0's weight_ih columns read the input's features; a read or given state ties unit j across layers and directions (always, for ATen's call: one hidden size); time is mixed."""
    x = input
    if not isinstance(x, AxisLabels):
        raise RuleDeclined("a PackedSequence input (its data and batch sizes are one flat tensor)")
    aten_call = module is None
    m = _aten_layer(params, has_biases, num_layers, bidirectional, batch_first, mode) if aten_call else module
    name = ctx.node.target
    if getattr(m, "proj_size", 0):
        return _projected(ctx, m, x, hx, params, meta)
    pruned = isinstance(m, PrunedRNN)
    slots = rnn_slots(m.num_layers, m.bidirectional)
    dirs = 2 if m.bidirectional else 1
    sizes = list(m.hidden_sizes) if pruned else [m.hidden_size] * len(slots)
    width = m.state_size if pruned else m.hidden_size
    lstm = m.mode == "LSTM"
    states = [] if hx is None else list(hx) if isinstance(hx, (tuple, list)) else [hx]
    if not all(isinstance(s, AxisLabels) for s in states):
        raise RuleDeclined("an initial state that is not a tensor")
    batched = x.ndim == 3
    t_axis = (1 if m.batch_first else 0) if batched else 0
    b_axis = (0 if m.batch_first else 1) if batched else None

    # NB: ATen's call runs one hidden size for every layer and direction (its state is one tensor):
    # the units are tied across them, so the call keeps working on the sliced weights
    if states or aten_call or state_read(ctx.node):
        state = ctx.fresh(width)
        pos = [np.searchsorted(m.state_index.cpu().numpy(), u) for u in _slot_units(m, slots)] if pruned \
            else [np.arange(width)] * len(slots)
        if pruned:
            ctx.tensor_lab(f"{name}.state_index", {0: state})
        units = [state[p] for p in pos]
        zero = np.ones(width, dtype=bool)
        # NB: a zero initial state (torch.zeros) holds no channel: every unit reads 0 from it, as
        # with no state; it still has one hidden axis for every layer and direction (tied above), and
        # the rewrite makes it at the new width
        zeros = bool(zero_states(ctx.node))
        for s in ([] if zeros else states):
            if (ctx.uf.find(s.ids[-1]) == PIN).any():
                ctx.pin(state, "an initial state that is not a channel (a model input, a constant) is read by every unit")
            ctx.tie(s.ids[-1], state)
            ctx.pin(list(s.ids[:-1]), "an initial state's layer and batch axes")
            if lstm or m.mode == "GRU":  # NB: h0 (GRU) and c0 (LSTM) reach a unit whose rows are zero
                zero &= s.zero[-1]
        unit_zero = [zero[p] for p in pos]
        state_ids, state_zero = state, zero
    else:
        units = [ctx.fresh(h) for h in sizes]
        unit_zero = [np.ones(h, dtype=bool) for h in sizes]
        state_ids, state_zero = pinned_axis(width), false_mask(width)

    gates = RNN_GATES[m.mode]
    for s, (k, rev) in enumerate(slots):
        sfx = rnn_slot_suffix(k, rev)
        rows = np.tile(units[s], gates)
        cols = x.ids[-1] if k == 0 else np.concatenate(units[(k - 1) * dirs:k * dirs])
        _slot_tensors(ctx, _FLAT if m.bias else _FLAT[:2], s, f"{name}.", sfx, params,
                      {"weight_ih": {0: rows, 1: cols}, "weight_hh": {0: rows, 1: units[s]}, "bias_ih": {0: rows},
                       "bias_hh": {0: rows}})
        if pruned:
            ctx.tensor_lab(f"{name}.units_{sfx}", {0: units[s]})
        ctx.extra_labels[f"{ctx.node.name}.units.{s}"] = units[s]
    ctx.pin(x.ids[t_axis], "the recurrence mixes time steps")

    out_meta = meta[0]
    shape = _out_shape(out_meta)
    ids, zero = [], []
    for d, n in enumerate(shape):
        if d == len(shape) - 1:
            ids.append(np.concatenate(units[-dirs:]))
            zero.append(np.concatenate(unit_zero[-dirs:]))
        elif d == b_axis:
            ids.append(x.ids[b_axis])
            zero.append(false_mask(n))
        else:
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
    out = AxisLabels(tuple(ids), tuple(zero))

    def state_lab(t: torch.Tensor) -> AxisLabels:
        sh = _out_shape(t)
        ids = [pinned_axis(sh[0])] + ([x.ids[b_axis]] if batched else []) + [state_ids]
        zero = [false_mask(sh[0])] + ([false_mask(sh[1])] if batched else []) + [state_zero]
        return AxisLabels(tuple(ids), tuple(zero))

    if aten_call:  # (output, h_n, c_n) / (output, h_n)
        return (out,) + tuple(state_lab(t) for t in meta[1:])
    if lstm:
        return (out, (state_lab(meta[1][0]), state_lab(meta[1][1])))
    return (out, state_lab(meta[1]))


def _projected(ctx: Ctx, m, x: AxisLabels, hx, params, meta):
    """An LSTM with ``proj_size > 0``: hidden unit j (its rows of weight_ih, weight_hh and biases in every
    gate block, weight_hr's column j, entry j of c) and projection unit p (weight_hr's row p, weight_hh's
    column p, the next layer's and the output's entry p, entry p of h) are rows, each tied across layers
    and directions (the stock layer takes one hidden and one projection size)."""
    aten_call = params is not None
    name = ctx.node.target
    if m.mode != "LSTM":
        raise RuleDeclined("proj_size on a layer that is not an LSTM")
    states = [] if hx is None else list(hx)
    if not all(isinstance(s, AxisLabels) for s in states):
        raise RuleDeclined("an initial state that is not a tensor")
    slots = rnn_slots(m.num_layers, m.bidirectional)
    dirs = 2 if m.bidirectional else 1
    hid, prj = ctx.fresh(m.hidden_size), ctx.fresh(m.proj_size)
    # NB: with its rows zero, hidden unit j keeps c'_j = c_j / 2 (zero when c0's entry is); projection
    # unit p writes h_p = weight_hr[p] . h_full = 0 whatever the state
    c_zero = np.ones(m.hidden_size, dtype=bool)
    if states and not zero_states(ctx.node):
        for s, ids in zip(states, (prj, hid)):
            if (ctx.uf.find(s.ids[-1]) == PIN).any():
                ctx.pin(ids, "an initial state that is not a channel (a model input, a constant) is read by every unit")
            ctx.tie(s.ids[-1], ids)
            ctx.pin(list(s.ids[:-1]), "an initial state's layer and batch axes")
        c_zero &= states[1].zero[-1]
    rows = np.tile(hid, RNN_GATES["LSTM"])
    kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if m.bias else ()) + ("weight_hr",)
    for s, (k, rev) in enumerate(slots):
        cols = x.ids[-1] if k == 0 else np.concatenate([prj] * dirs)
        _slot_tensors(ctx, kinds, s, f"{name}.", rnn_slot_suffix(k, rev), params,
                      {"weight_ih": {0: rows, 1: cols}, "weight_hh": {0: rows, 1: prj}, "bias_ih": {0: rows},
                       "bias_hh": {0: rows}, "weight_hr": {0: prj, 1: hid}})
        ctx.extra_labels[f"{ctx.node.name}.units.{s}"] = hid
        ctx.extra_labels[f"{ctx.node.name}.proj.{s}"] = prj
    batched = x.ndim == 3
    b_axis = (0 if m.batch_first else 1) if batched else None
    ctx.pin(x.ids[(1 if m.batch_first else 0) if batched else 0], "the recurrence mixes time steps")
    shape = _out_shape(meta[0])
    ids = [np.concatenate([prj] * dirs) if d == len(shape) - 1 else x.ids[b_axis] if d == b_axis
           else pinned_axis(n) for d, n in enumerate(shape)]
    zero = [np.ones(n, dtype=bool) if d == len(shape) - 1 else false_mask(n) for d, n in enumerate(shape)]
    out = AxisLabels(tuple(ids), tuple(zero))

    def state_lab(t: torch.Tensor, units: np.ndarray, z: np.ndarray) -> AxisLabels:
        sh = _out_shape(t)
        return AxisLabels(tuple([pinned_axis(sh[0])] + ([x.ids[b_axis]] if batched else []) + [units]),
                          tuple([false_mask(sh[0])] + ([false_mask(sh[1])] if batched else []) + [z]))

    h_meta, c_meta = (meta[1], meta[2]) if aten_call else meta[1]
    h_n, c_n = state_lab(h_meta, prj, np.ones(len(prj), dtype=bool)), state_lab(c_meta, hid, c_zero)
    return (out, h_n, c_n) if aten_call else (out, (h_n, c_n))


def _rnn_module(node, m, args, kwargs):
    return dict(input=args[0] if args else kwargs.get("input"),
                hx=args[1] if len(args) > 1 else kwargs.get("hx"), module=m)


# NB: the compressed model's PrunedRNN goes through the same rule, so a compressed model compressed
# again finds the same kind of rows
modules("recurrent", [nn.LSTM, nn.GRU, nn.RNN, PrunedRNN], _rnn_module)
# NB: the ``input`` overloads only: ``data`` ones take a PackedSequence's flat data and batch sizes
functions("recurrent", _ov(aten.lstm, "input"), mode="LSTM")
functions("recurrent", _ov(aten.gru, "input"), mode="GRU")
functions("recurrent", _ov(aten.rnn_tanh, "input"), mode="RNN_TANH")
functions("recurrent", _ov(aten.rnn_relu, "input"), mode="RNN_RELU")


# -- one step: LSTMCell / GRUCell / RNNCell and ATen's lstm_cell / gru_cell / rnn_*_cell ----------


def _cell_fix(site, **_):
    """A stock cell takes its sizes from its sliced weights; a zero initial state made at the old width
    (a literal last size) is made at the new one."""
    units = site.plan.zigset.labels.get(f"{site.node.name}.units")
    if units is None:
        return
    old, new = len(units), int(site._keep_ids(units).sum())
    if new != old:
        _narrow_zero_states(site.node, old, new)
    if isinstance(site.module, nn.RNNCellBase):
        resize_stock_cell(site.module)


@rule("recurrent_cell", fix=_cell_fix, reads_params=True)
def recurrent_cell(ctx: Ctx, input, hx=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None, mode="LSTM", meta=None, **_):
    """One LSTM/GRU/RNN step: hidden unit j is a channel (its rows of w_ih, w_hh and the biases in every gate block, its w_hh column, entry j of the state in and out: a state read back next step ties the steps' units); w_ih's columns read the input's features; the batch axis passes."""
    x = input
    if not isinstance(x, AxisLabels):
        raise RuleDeclined("an input that is not a tensor")
    states = [] if hx is None else list(hx) if isinstance(hx, (tuple, list)) else [hx]
    if not all(isinstance(s, AxisLabels) for s in states):
        raise RuleDeclined("a state that is not a tensor")
    lstm = mode == "LSTM"
    out_meta = meta[0] if lstm else meta
    shape = _out_shape(out_meta)
    units = ctx.fresh(shape[-1])
    rows = np.tile(units, RNN_GATES[mode])
    ctx.param(w_ih, {0: rows, 1: x.ids[-1]})
    ctx.param(w_hh, {0: rows, 1: units})
    ctx.param(b_ih, {0: rows})
    ctx.param(b_hh, {0: rows})
    ctx.extra_labels[f"{ctx.node.name}.units"] = units
    # NB: a zero state (torch.zeros, new_zeros) holds no channel: unit j reads 0 from it; the
    # rewrite makes it at the new width. Any other state's entry j is unit j's (w_hh's column j reads
    # h_j; c_j and GRU's h_j carry on into unit j).
    zero = np.ones(len(units), dtype=bool)
    if not zero_states(ctx.node):
        for i, s in enumerate(states):
            if (ctx.uf.find(s.ids[-1]) == PIN).any():
                ctx.pin(units, "a state that is not a channel (a model input, a constant) is read by every unit")
            ctx.tie(s.ids[-1], units)
            if s.ndim > 1:
                ctx.tie(s.ids[0], x.ids[0]) if x.ndim > 1 else ctx.pin(list(s.ids[:-1]), "a state's leading axes")
            # with its rows zero, unit j computes c'_j = c_j / 2 (LSTM; h'_j = tanh(c'_j) / 2),
            # h'_j = h_j / 2 (GRU), act(0) = 0 (RNN): zero when the state's entry is
            if (lstm and i == 1) or (mode == "GRU" and i == 0):
                zero &= s.zero[-1]
    batched = len(shape) > 1

    def lab() -> AxisLabels:
        if batched:
            return AxisLabels((x.ids[0], units), (false_mask(shape[0]), zero.copy()))
        return AxisLabels((units,), (zero.copy(),))

    return (lab(), lab()) if lstm else lab()


def _cell_module(node, m, args, kwargs):
    t = node.target
    mode = "LSTM" if isinstance(m, nn.LSTMCell) else "GRU" if isinstance(m, nn.GRUCell) else \
        "RNN_TANH" if m.nonlinearity == "tanh" else "RNN_RELU"
    bound = dict(input=args[0] if args else kwargs.get("input"), hx=args[1] if len(args) > 1 else kwargs.get("hx"),
                 w_ih=ParamRef(f"{t}.weight_ih"), w_hh=ParamRef(f"{t}.weight_hh"), mode=mode, module=m)
    if m.bias:
        bound.update(b_ih=ParamRef(f"{t}.bias_ih"), b_hh=ParamRef(f"{t}.bias_hh"))
    return bound


modules("recurrent_cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell], _cell_module)
functions("recurrent_cell", _ov(aten.lstm_cell, "default"), mode="LSTM")
functions("recurrent_cell", _ov(aten.gru_cell, "default"), mode="GRU")
functions("recurrent_cell", _ov(aten.rnn_tanh_cell, "default"), mode="RNN_TANH")
functions("recurrent_cell", _ov(aten.rnn_relu_cell, "default"), mode="RNN_RELU")
