"""Hand-off of frozen SLB weights to torchao, and the size report.

``to_torchao(frozen)`` replaces every frozen weight of a model from :func:`otofx.slb.freeze` by a
torchao ``IntxUnpackedToInt8Tensor`` (torchao >= 0.18, ``pip install -e ".[quant]"``), Conv and
Linear alike; torchao's tensor implements ``linear`` and ``conv2d`` by dequantising, and is what
``torch.export``/ExecuTorch lower to low-bit kernels. ``size_report(model)`` counts the bits.

SLB's grid ``s * linspace(-1, 1, K)`` (``K = 2**b``) is affine in the grid index ``i``:
``s * (2 i / (K - 1) - 1) = scale * (q - zero_point)`` with ``q = i - K/2`` (in ``int{b}``'s range
``[-K/2, K/2 - 1]``), ``scale = 2 s / (K - 1)`` per output channel and ``zero_point = -1/2``. One
bit fits ``torch.int1`` this way (``q`` in ``{-1, 0}``).

A weight read as ``x @ W.T`` (Falcon's Linear) becomes a ``linear`` call in the graph form; one read
by other products (``W @ x``, ``bmm``), or by a module's own forward in the module form, stays a
plain tensor on the grid, with a warning. A weight stored ``[in, out]`` and read as ``x @ W`` (``addmm``/``mm``/``matmul``: transformers'
``Conv1D``) is handed over transposed, ``[out, in]``, and its products become ``linear`` calls in
the copy's graph (torchao's tensor implements ``linear``, not ``addmm``). Weights an attention
module reads itself (``nn.MultiheadAttention``'s projections) stay plain tensors, with a warning:
its forward runs ops torchao's tensor does not implement. Any other op that reads a
handed-over weight in the graph (a tied embedding) reads its dequantised values, and an exported
graph's ``aten.linear``/``aten.conv2d`` calls on them become ``F.linear``/``F.conv2d`` (the aten ops
are composite: they would reach torchao's tensor already split into ops it does not implement).

A weight tied between modules (``aux.weight = head.weight``) is one torchao tensor in every
Linear/Conv2d holder (and every holder a graph reads); an embedding holding it keeps the frozen
values. Frozen weights or scales that are not finite (a diverged run) raise an
:class:`otofx.errors.InputError` naming them (``freeze`` warns).

Internals:
    * The tensor is built with ``IntxUnpackedToInt8Tensor(qdata, scale, zero_point, ...)`` from the
      grid indices, not with ``from_hp(..., custom_scale=, custom_zero_point=)``: ``from_hp``
      quantises with ``round(w / scale) + zero_point``, which puts half-integer grid points on the
      wrong integer when the zero point is -1/2 (checked on torchao 0.18.0). The indices come from
      the frozen weights and are checked to reproduce them (dequantisation error aside).
    * "Packed" bytes are ``ceil(n * b / 8)`` per layer plus one float32 scale per output channel;
      torchao's unpacked tensor holds one int8 per weight in memory (and a scale and zero point per
      channel): the report gives both, against float32.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from otofx.errors import InputError, OTOError
from otofx.passes.nodes import copy_module, parameter_holders

log = logging.getLogger("otofx")


def _frozen(model: nn.Module, what: str) -> dict:
    info = getattr(model, "otofx_slb", None)
    if not isinstance(info, dict) or not info:
        raise InputError(f"{what} takes the model returned by otofx.slb.freeze(q) (it records the frozen layers); "
                         f"{type(model).__name__} has none")
    return info


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def grid_indices(w: torch.Tensor, bits: int, scale: torch.Tensor | None, out_dim: int = 0) -> torch.Tensor:
    """The grid index of every weight of a frozen layer (``w = s * linspace(-1, 1, 2**b)[i]``, ``s``
    along the output channels, dim ``out_dim``)."""
    from otofx.slb.modules import _channel_view

    k = 2 ** bits
    s = torch.ones(w.shape[out_dim], dtype=w.dtype, device=w.device) if scale is None else scale.to(w.dtype)
    sv = _channel_view(s, w.dim(), out_dim)
    safe = torch.where(sv == 0, torch.ones_like(sv), sv)
    return torch.round((w / safe + 1) * (k - 1) / 2).clamp(0, k - 1).long()


def nonfinite(parts: dict) -> str:
    """``"scale and weights"``-like: the names of ``parts`` (``{name: tensor or None}``) holding NaN or
    inf ("" when none does)."""
    return " and ".join(k for k, t in parts.items() if t is not None and not bool(torch.isfinite(t.detach()).all()))


def _check_finite(model: nn.Module, info: dict, what: str) -> None:
    """Raise :class:`InputError` naming the frozen weights (or scales) of ``model`` that hold NaN or
    inf: a diverged run, whose weights have no grid index to hand over."""
    bad = []
    for name, layer in info.items():
        module, attr = _owner(model, name)
        w = getattr(module, attr)
        if type(w) is not torch.Tensor and hasattr(w, "dequantize"):
            w = w.dequantize()
        parts = nonfinite({"scale": layer.scale, "weights": w})
        if parts:
            bad.append(f"'{name}' ({parts})")
    if bad:
        raise InputError(f"{what}: non-finite (NaN or inf) frozen values in {', '.join(bad)}: the training diverged; "
                         "train again with a lower learning rate (or clipped gradients), or leave those layers out "
                         "(layers=)")


def to_torchao(frozen: nn.Module) -> nn.Module:
    """A copy of ``frozen`` whose SLB weights are torchao ``IntxUnpackedToInt8Tensor`` parameters."""
    info = _frozen(frozen, "otofx.slb.to_torchao")
    try:
        from torchao.quantization import IntxUnpackedToInt8Tensor
    except ImportError as e:
        raise OTOError('otofx.slb.to_torchao needs torchao (>= 0.18): pip install -e ".[quant]"') from e
    from otofx.slb.modules import grid

    _check_finite(frozen, info, "otofx.slb.to_torchao")
    out = copy_module(frozen)
    holders = parameter_holders(out)
    module_names = {id(m): n for n, m in out.named_modules(remove_duplicate=False)}
    aliases: set = set()  # other names of handed-over tied weights, read in the graph
    experts = sorted(name for name, layer in info.items() if layer.batch)
    if experts:
        # NB: torchao's tensor implements linear, not the grouped products fused experts run
        log.warning("otofx.slb.to_torchao: %d fused expert weight(s) stay plain tensors (their values are on the "
                    "grid already): %s", len(experts), ", ".join(experts))
    inside = sorted(name for name in info if _inside_attention(out, name))
    if inside:
        # NB: nn.MultiheadAttention runs F.multi_head_attention_forward (or its fused kernel) on its
        # weights, which torchao's tensor does not implement: those stay plain tensors on the grid
        log.warning("otofx.slb.to_torchao: %d weight(s) are read inside an attention module and stay plain "
                    "tensors (their values are on the grid already): %s", len(inside), ", ".join(inside))
    graph = getattr(out, "graph", None)
    # NB: x @ W.T (Falcon's Linear), W @ x, bmm: torchao's tensor runs none of them. A graph's
    # x @ W.T becomes linear(x, W) (``swapped``) and any other read takes W.dequantize(); a module's
    # own forward cannot be rewritten, nor a weight stored [in, out] that is not read as x @ W
    unplain = {name for name, layer in info.items() if not layer.plain and not layer.batch and name not in inside}
    loose = sorted(name for name in unplain if graph is None or info[name].out_dim != 0)
    swapped = unplain - set(loose)
    if loose:
        log.warning("otofx.slb.to_torchao: %d weight(s) are read by products torchao's tensor does not run (x @ W.T, "
                    "W @ x, bmm) and stay plain tensors (their values are on the grid already)%s: %s", len(loose),
                    "; quantise with form='graph' to hand over x @ W.T as linear" if graph is None else "",
                    ", ".join(loose))
    for name, layer in info.items():
        if name in inside or layer.batch or name in loose:
            continue
        module, attr = _owner(out, name)
        w = getattr(module, attr).detach()
        if layer.out_dim == 1:
            # x @ W becomes linear(x, W.t()) below: torchao's tensor implements linear, not addmm/mm
            w = w.t().contiguous()
        k = 2 ** layer.bits
        scale = None if layer.scale is None else layer.scale.to(w.device)
        idx = grid_indices(w, layer.bits, scale)
        s = torch.ones(w.shape[0], dtype=w.dtype, device=w.device) if scale is None else scale.to(w.dtype)
        shape = (-1, *([1] * (w.dim() - 1)))
        back = grid(layer.bits, w.dtype).to(w.device)[idx] * s.reshape(shape)
        # NB: a bf16/fp16 weight is the grid value times the scale rounded in its dtype
        tol = max(1e-6, 2 * torch.finfo(w.dtype).eps) * max(1.0, float(s.abs().max()))
        if not torch.allclose(back, w, rtol=0, atol=tol):
            raise InputError(f"weight '{name}' is not on its {layer.bits}-bit SLB grid: was it changed after freeze()?")
        t = IntxUnpackedToInt8Tensor(
            qdata=(idx - k // 2).to(torch.int8), scale=(2 * s / (k - 1)).reshape(shape),
            zero_point=torch.full((w.shape[0], *([1] * (w.dim() - 1))), -0.5, dtype=w.dtype, device=w.device),
            target_dtype=getattr(torch, f"int{layer.bits}"), block_size=(1, *w.shape[1:]), dtype=w.dtype,
            activation_quantization=None)
        p = nn.Parameter(t, requires_grad=False)
        tied = holders.get(id(module._parameters.get(attr)), []) if layer.out_dim == 0 else []
        setattr(module, attr, p)
        for m, a in tied:
            # a weight tied between modules (aux.weight = head.weight): every Linear/Conv2d holder takes
            # the same tensor (torchao's runs linear and conv2d), and in a graph every holder its reads
            # are (a torch.export graph's plain modules; _torchao_reads makes them reads torchao runs);
            # any other (an embedding's forward) keeps the frozen values
            if m._parameters.get(a) is not p and (type(m) in (nn.Linear, nn.Conv2d) or
                                                 graph is not None and type(m) is nn.Module):
                m._parameters[a] = p
                if graph is not None:
                    aliases.add(f"{module_names[id(m)]}.{a}" if module_names[id(m)] else a)
    transposed = {name for name, layer in info.items() if layer.out_dim == 1 and name not in inside and not layer.batch
                  and name not in loose}
    if transposed and graph is not None:
        _products_to_linear(out, transposed)
    elif transposed:  # the module form: transformers' Conv1D modules become the Linear they compute
        _conv1d_to_linear(out, transposed)
    if swapped:
        _swapped_products_to_linear(out, swapped)
    _torchao_reads(out, (set(info) | aliases) - set(inside) - set(experts) - set(loose))
    out.otofx_slb = {name: dataclasses.replace(layer, out_dim=0) if name in transposed else layer
                     for name, layer in info.items()}
    # NB: GraphModule's deepcopy drops plain attributes; the transposed weights are [out, in] now
    log.info("otofx.slb: %d layers handed to torchao IntxUnpackedToInt8Tensor", len(info))
    return out


def _conv1d_to_linear(model: nn.Module, names: set) -> None:
    """Replace each transformers ``Conv1D`` holding one of ``names`` (its weight already the
    transposed torchao tensor) by an ``nn.Linear``: ``addmm(b, x, W)`` is ``linear(x, W.t(), b)``."""
    from otofx.passes.nodes import is_hf_conv1d

    for name in sorted(names):
        mod_name = name.rpartition(".")[0]
        conv = model.get_submodule(mod_name)
        if not is_hf_conv1d(conv):
            raise InputError(f"otofx.slb.to_torchao: '{name}' is read as x @ W by {type(conv).__name__}, which "
                             "cannot take torchao's tensor; quantise with form='graph' (its graph is rewritten)")
        w = conv.weight
        lin = nn.Linear(w.shape[1], w.shape[0], bias=conv.bias is not None, device="meta")
        lin.weight = w
        if conv.bias is not None:
            lin.bias = conv.bias
        slots = getattr(conv, "_slb_act_slots", None)
        if slots is not None:  # the module form's activation quantisers go along (their pre-hook too)
            from otofx.passes.slb import _quantise_inputs

            for qname, q in conv.named_children():
                lin.add_module(qname, q)
            lin._slb_act_slots = [(pos, "input", qname) for pos, _, qname in slots]
            lin.register_forward_pre_hook(_quantise_inputs, with_kwargs=True)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)


def _inside_attention(model: nn.Module, name: str) -> bool:
    """Whether the weight ``name`` is one an attention module reads itself (its input projections,
    or its ``out_proj``'s weight)."""
    from otofx.passes.modules import attention_reader

    return attention_reader(model, name.rpartition(".")[0]) is not None


def _products_to_linear(gm: nn.Module, names: set) -> None:
    """Rewrite every ``addmm(b, x, W)``, ``mm(x, W)``, ``matmul(x, W)`` of ``gm``'s graph whose ``W``
    is one of ``names`` (now stored transposed, ``[out, in]``) as ``linear(x, W, b)``."""
    from otofx.passes.slb import _product

    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in names:
            continue
        for user in list(node.users):
            hit = _product(user, parameter=False) if user.op == "call_function" else None
            if hit is None or hit.weight is not node or not hit.plain:
                raise InputError(f"otofx.slb.to_torchao: node '{user.name}' ({user.target}) reads the [in, out] weight "
                                 f"'{node.target}' other than as x @ W; quantise that weight with layers= excluding it")
            _as_linear(graph, user, node, hit)
    graph.lint()
    gm.recompile()


def _as_linear(graph, user, node, hit) -> None:
    """Replace the product ``user`` (``x @ W`` or ``x @ W.T``, as :func:`_product` read it) by
    ``linear(x, W, b)`` on the weight ``node`` (``[out, in]``); addmm's bias is its first argument."""
    x = user.args[hit.input]
    args = (x, node, user.args[0]) if hit.input == 1 else (x, node)
    with graph.inserting_before(user):
        new = graph.call_function(torch.nn.functional.linear, args)
    new.meta = dict(user.meta)
    user.replace_all_uses_with(new)
    graph.erase_node(user)


def _swapped_products_to_linear(gm: nn.Module, names: set) -> None:
    """Rewrite every ``x @ W.T`` of ``gm``'s graph (``matmul``/``mm(x, t(W))``, ``addmm(b, x, t(W))``)
    whose ``W`` is one of ``names`` (stored ``[out, in]``) as ``linear(x, W, b)``; the swap goes when
    nothing else reads it. Other reads are left to :func:`_torchao_reads` (dequantised values)."""
    from otofx.passes.slb import _product, _swaps

    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in names:
            continue
        for swap in list(node.users):
            if swap.op not in ("call_function", "call_method") or swap.args[:1] != (node,) or _swaps(swap, 2) != 1:
                continue
            for user in list(swap.users):
                hit = _product(user, parameter=False) if user.op == "call_function" else None
                if hit is None or hit.weight is not node or hit.out_dim != 0 or hit.batch or swap not in user.args:
                    continue
                if user.args.index(swap) != hit.input + 1:
                    continue  # the weight on the left: W.T @ x is no linear
                _as_linear(graph, user, node, hit)
                changed = True
            if not swap.users:
                graph.erase_node(swap)
    if changed:
        graph.lint()
        gm.recompile()


# aten ops in an exported graph -> the functions torchao's tensor intercepts (``__torch_function__``)
_AS_FUNCTION = {torch.ops.aten.linear.default: torch.nn.functional.linear,
                torch.ops.aten.conv2d.default: torch.nn.functional.conv2d}
_TORCHAO_OPS = (torch.nn.functional.linear, torch.nn.functional.conv2d)


def _torchao_reads(gm: nn.Module, names: set) -> None:
    """Make every graph read of a handed-over weight one that torchao's tensor runs:

    * ``aten.linear``/``aten.conv2d`` (torch.export's graphs) become ``F.linear``/``F.conv2d``: the
      aten ops are composite, so they reach the tensor already split into ``t``/``addmm`` or
      ``convolution``, which it does not implement; the functions it intercepts whole;
    * any other op (a tied embedding: GPT-2's ``wte`` is its head's weight) reads ``W.dequantize()``,
      the same values. # NB: torchao 0.18's ``aten.embedding`` on its tensor takes the arguments in
      ``F.embedding``'s order (indices first) and fails.
    """
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    changed = False
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in names:
            continue
        others = []
        for u in list(node.users):
            if u.op == "call_function" and len(u.args) > 1 and u.args[1] is node and node not in u.args[:1]:
                if u.target in _AS_FUNCTION:
                    u.target = _AS_FUNCTION[u.target]
                    changed = True
                if u.target in _TORCHAO_OPS:
                    continue
            others.append(u)
        if others:
            with graph.inserting_after(node):
                deq = graph.call_method("dequantize", (node,))
            for u in others:
                u.replace_input_with(node, deq)
            changed = True
    if changed:
        graph.lint()
        gm.recompile()


@dataclass(frozen=True)
class LayerSize:
    name: str
    numel: int
    bits: int  # 32 for float weights
    distinct: int  # distinct values (per output channel when the layer has a scale: the most of any channel)
    packed_bytes: int  # ceil(numel * bits / 8) + 4 bytes per scale


@dataclass(frozen=True)
class SizeReport:
    """Bits per weight and bytes of a frozen model against float32 (all parameters and buffers)."""

    layers: tuple  # LayerSize per frozen layer
    quantised_weights: int
    other_elements: int  # every other parameter and buffer element, counted as float32
    float32_bytes: int  # the whole model in float32
    packed_bytes: int  # frozen layers packed at b bits (+ scales), the rest float32
    int8_bytes: int  # frozen layers as torchao's unpacked int8 (+ scale and zero point), the rest float32

    @property
    def bits_per_weight(self) -> float:
        """Average bits of the frozen layers' weights (scales included)."""
        bits = sum(8 * ls.packed_bytes for ls in self.layers)
        return bits / max(self.quantised_weights, 1)

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.float32_bytes

    def table(self) -> str:
        from tabulate import tabulate

        rows = [[ls.name, ls.numel, ls.bits, ls.distinct, ls.packed_bytes, 4 * ls.numel] for ls in self.layers]
        rows.append(["model", self.quantised_weights + self.other_elements, "",
                     "", self.packed_bytes, self.float32_bytes])
        text = tabulate(rows, headers=["weight", "elements", "bits", "max distinct", "bytes packed", "bytes float32"],
                        tablefmt="github")
        return (f"{text}\nbits per quantised weight {self.bits_per_weight:.3f}; model {self.packed_bytes:,} bytes packed, "
                f"{self.int8_bytes:,} as torchao int8 (unpacked), {self.float32_bytes:,} in float32 "
                f"(x{self.ratio:.3f} packed, x{self.int8_bytes / self.float32_bytes:.3f} int8)")


def size_report(frozen: nn.Module) -> SizeReport:
    """The :class:`SizeReport` of a model from :func:`otofx.slb.freeze`."""
    info = _frozen(frozen, "otofx.slb.size_report")
    layers, qnames = [], set()
    for name, layer in info.items():
        module, attr = _owner(frozen, name)
        w = getattr(module, attr).detach()
        if type(w) is not torch.Tensor and hasattr(w, "dequantize"):  # after to_torchao
            w = w.dequantize()
        rows = _rows(w, layer)
        distinct = max(int(torch.unique(r).numel()) for r in rows) if layer.scale is not None else int(torch.unique(w).numel())
        scales = 4 * rows.shape[0] if layer.scale is not None else 0
        layers.append(LayerSize(name, w.numel(), layer.bits, distinct, math.ceil(w.numel() * layer.bits / 8) + scales))
        qnames.add(name)
    seen, other = set(), 0
    for name, t in list(frozen.named_parameters()) + list(frozen.named_buffers()):
        if name in qnames or id(t) in seen:
            continue
        seen.add(id(t))
        other += t.numel()
    nq = sum(ls.numel for ls in layers)
    fp32 = 4 * (nq + other)
    int8 = sum(ls.numel + 8 * _channels(frozen, ls.name, info[ls.name]) for ls in layers)  # + scale, zero point
    return SizeReport(tuple(layers), nq, other, fp32, sum(ls.packed_bytes for ls in layers) + 4 * other, int8 + 4 * other)


def _rows(w: torch.Tensor, layer) -> torch.Tensor:
    """``w`` as one row per output channel (per expert and channel for fused experts)."""
    if layer.batch:
        return w.movedim(layer.out_dim, 1).reshape(w.shape[0] * w.shape[layer.out_dim], -1)
    return w.movedim(layer.out_dim, 0).reshape(w.shape[layer.out_dim], -1)


def _channels(model: nn.Module, name: str, layer) -> int:
    module, attr = _owner(model, name)
    w = getattr(module, attr)
    return w.shape[0] * w.shape[layer.out_dim] if layer.batch else w.shape[layer.out_dim]


__all__ = ["to_torchao", "size_report", "SizeReport", "LayerSize", "grid_indices", "nonfinite"]
