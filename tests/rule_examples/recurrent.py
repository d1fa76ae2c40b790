"""Examples for the recurrent rule (nn.LSTM, nn.GRU, nn.RNN): passes/rules/recurrent.py."""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import N, Net, _force_export, example


def _seq(rnn: nn.Module, read_state: bool = False, export: bool = False):
    """Linear -> ReLU -> Linear -> recurrent layer -> Linear on its output (and on the last layer's final
    state); ``export``: a size test only torch.export takes (the layer becomes ATen's lstm/gru/rnn_* call)."""
    dirs = 2 if rnn.bidirectional else 1
    hidden = getattr(rnn, "proj_size", 0) or rnn.hidden_size

    def fwd(s, x):
        if export:
            _force_export(x)
        o, st = s.rnn(s.inp(x))
        y = s.out(o)
        if read_state:
            h = st[0] if isinstance(s.rnn, nn.LSTM) else st
            y = y + s.head(h[-1]).unsqueeze(1 if s.rnn.batch_first else 0)
        return y

    members = dict(inp=nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, rnn.input_size)), rnn=rnn, out=nn.Linear(hidden * dirs, 3))
    if read_state:
        members["head"] = nn.Linear(hidden, 3)
    x = torch.randn(N, 6, 5) if rnn.batch_first else torch.randn(6, N, 5)
    return Net(fwd, **members), x


@example("recurrent")
def lstm_bidirectional_two_layers():
    return _seq(nn.LSTM(6, 8, num_layers=2, bidirectional=True))


@example("recurrent")
def gru_batch_first_no_bias():
    return _seq(nn.GRU(6, 8, num_layers=2, batch_first=True, bias=False))


@example("recurrent")
def rnn_relu_bidirectional():
    return _seq(nn.RNN(6, 8, nonlinearity="relu", bidirectional=True))


@example("recurrent")
def lstm_state_read():
    """h_n is read: unit j of every layer and direction is one row."""
    return _seq(nn.LSTM(6, 8, num_layers=2, bidirectional=True), read_state=True)


@example("recurrent")
def lstm_projection_two_layers_bidirectional():
    """proj_size > 0: hidden units and projection units are rows, each tied across layers and directions."""
    return _seq(nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=4), read_state=True)


@example("recurrent", frontend="export")
def lstm_bidirectional_two_layers_export():
    """ATen's lstm runs one hidden size: unit j of every layer and direction is one row."""
    return _seq(nn.LSTM(6, 8, num_layers=2, bidirectional=True), read_state=True, export=True)


@example("recurrent", frontend="export")
def gru_batch_first_export():
    return _seq(nn.GRU(6, 8, num_layers=2, batch_first=True), export=True)


@example("recurrent", frontend="export")
def rnn_tanh_no_bias_export():
    return _seq(nn.RNN(6, 8, bias=False), export=True)


@example("recurrent", frontend="export")
def lstm_projection_export():
    return _seq(nn.LSTM(6, 8, proj_size=4, bias=False), export=True)


def _steps(cell: nn.Module, state: str, steps=None):
    """Linear -> ReLU -> a cell run over the time axis -> Linear on every step's h.

    ``state``: "zeros" (``x.new_zeros``, c0 its clone), "layer" (h0 from a Linear of the input's mean),
    "none" (the cell makes its own zero state); ``steps``: a fixed count (symbolic_trace), or None
    for ``range(x.shape[1])`` (a Python loop over a size, which only torch.export unrolls)."""
    lstm = isinstance(cell, nn.LSTMCell)

    def fwd(s, x):
        if state == "zeros":
            h = x.new_zeros(x.shape[0], s.cell.hidden_size)
            st = (h, h.clone()) if lstm else h
        elif state == "layer":
            h = torch.tanh(s.h0(x.mean(1)))
            st = (h, torch.zeros_like(h)) if lstm else h
        else:
            st = None
        ys = []
        for t in range(steps if steps is not None else x.shape[1]):
            st = s.cell(s.inp(x[:, t]), st)
            ys.append(s.out(st[0] if lstm else st))
        return torch.stack(ys, 1)

    members = dict(inp=nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, cell.input_size)), cell=cell,
                   out=nn.Linear(cell.hidden_size, 3))
    if state == "layer":
        members["h0"] = nn.Linear(5, cell.hidden_size)
    return Net(fwd, **members), torch.randn(N, 4, 5)


@example("recurrent_cell")
def lstm_cell_zero_state():
    return _steps(nn.LSTMCell(6, 8), "zeros", steps=4)


@example("recurrent_cell")
def gru_cell_state_from_a_layer():
    """h0 = tanh(Linear(x)): the layer's rows join the cell's units."""
    return _steps(nn.GRUCell(6, 8), "layer", steps=4)


@example("recurrent_cell")
def rnn_cell_relu_no_bias():
    return _steps(nn.RNNCell(6, 8, bias=False, nonlinearity="relu"), "none", steps=4)


@example("recurrent_cell", frontend="export")
def lstm_cell_loop_over_a_size_export():
    """``for t in range(x.shape[1])``: export unrolls it into ATen lstm_cell calls."""
    return _steps(nn.LSTMCell(6, 8), "zeros")


@example("recurrent_cell", frontend="export")
def gru_cell_own_zero_state_export():
    """No state given: the cell's own zeros (ATen zeros in the graph) are made at the new width."""
    return _steps(nn.GRUCell(6, 8), "none")


@example("recurrent_cell", frontend="export")
def rnn_cell_tanh_state_from_a_layer_export():
    return _steps(nn.RNNCell(6, 8), "layer")
