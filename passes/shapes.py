"""Shape propagation on the meta device: every node gets ``node.meta["val"]``.

Runs the graph once on meta tensors (no data, no compute, no FLOPs), so analysing a large model
costs only dispatch. Nothing of the model is mutated: submodules run through
``torch.func.functional_call`` with meta copies of their parameters and buffers, so even a
BatchNorm in train mode updates a meta buffer, never the real one.

Internals:
    Common ops skip torch's meta kernels, whose Python decompositions cost milliseconds a call:
    Conv and Linear shapes by formula, broadcasting arithmetic, concatenation, adaptive pooling,
    and ops that keep their input's shape (activations, norms). Each fast path gives the layout torch would
    (strides matter to later views) or falls back to running the op.
    Values that are not tensors (sizes, tuples) are stored as they are. When the meta run fails
    at an op that needs values (``.item()``, ``unique_consecutive``: a check on the input's
    contents, a count read back to size an output), the graph is run once on the real example
    inputs and weights instead (:class:`RealProp`, buffers read as copies: the model is not
    changed); a model on the meta device, or a failure there too, gives a ShapePropError that
    names the node of the meta run.
"""
from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch.func import functional_call
from torch.utils._pytree import tree_map

from otofx.errors import OTOError
from otofx.passes.nodes import INPLACE_ARITHMETIC
from otofx.passes.registry import CONTIGUOUS_OUT, ELEMENTWISE, RULES, form_of


class ShapePropError(OTOError):
    pass


log = logging.getLogger(__name__)
_META = torch.device("meta")


def _meta(x):
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta", requires_grad=False)
    return x


def meta_like(tree):
    return tree_map(_meta, tree)


# NB: norms on meta run Python decompositions (3-4 ms a call); ops whose rule keeps shape and dtype
# (``Rule.keeps_shape``) get their input's meta value instead of being run


def _keeps_shape(n: fx.Node, modules: dict) -> str | None:
    """How ``n``'s output layout follows its input (``Rule.keeps_shape``) when its output has its
    input's shape, dtype and layout rule, else None."""
    form = form_of(n, modules)
    # NB: a copy that may change dtype or strides (to, float, contiguous, clone) is run: a later
    # view depends on the strides
    if form is None or form.changes_dtype_or_strides:
        return None
    return RULES[form.rule].keeps_shape


def _same_shape_out(layout: str, x: torch.Tensor):
    """The meta output of a shape-keeping op on ``x`` with torch's layout, or None to run the op.

    # NB: layouts matter to later views: elementwise ops keep a dense input's layout, layer_norm
    # always returns a contiguous tensor (a permuted input included), batch/group norm keep a
    # contiguous one; anything else runs on meta
    """
    if layout == CONTIGUOUS_OUT:
        return x if x.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=_META)
    if layout == ELEMENTWISE:
        return x if _dense_strides(x) is not None else None
    return x if x.is_contiguous() else None


def _view_as_reshape(interp: fx.Interpreter, n: fx.Node, err: RuntimeError) -> torch.Tensor:
    """The output of a ``view`` that failed on meta strides, taken as a ``reshape``; else ``err`` again.

    # NB: a meta kernel may return other strides than the real kernel it stands for (torch 2.11's
    # scaled_dot_product_attention: contiguous on meta, (L, N, H, E)-ordered from the CPU kernel, which
    # torch.export's decomposition of nn.MultiheadAttention permutes and views). The model ran this view
    # on real tensors, so only the shape is asked of it here; verification later compares real outputs.
    """
    is_view = (n.op == "call_method" and n.target == "view") or \
        (n.op == "call_function" and n.target in (torch.ops.aten.view.default, torch.Tensor.view))
    if not is_view or "view size is not compatible" not in str(err):
        raise err
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    if len(args) == 2 and isinstance(args[1], torch.dtype):
        raise err
    shape = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple, torch.Size)) else args[1:]
    return args[0].reshape(*shape)


class MetaProp(fx.Interpreter):
    """Interpreter that records ``node.meta['val']`` from a run on meta tensors."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self._tensor_cache: dict[str, torch.Tensor] = {}

    def run(self, *args, **kwargs):
        # NB: one no_grad for the whole run (entering it per node cost 10% of the pass)
        with torch.no_grad():
            return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = None
            x = self.env[n.args[0]] if n.args and isinstance(n.args[0], fx.Node) else None
            if n.op in ("call_module", "call_function", "call_method") and \
                    isinstance(x, torch.Tensor) and x.device.type == "meta":
                layout = _keeps_shape(n, self.submodules)  # fx.Interpreter's name -> module dict
                if layout is not None:
                    out = _same_shape_out(layout, x)
            if out is None:
                try:
                    out = super().run_node(n)
                except RuntimeError as e:
                    out = _view_as_reshape(self, n, e)
        except OTOError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here is reported with its node
            what = (f"module '{n.target}' ({type(self.fetch_attr(n.target)).__name__})" if n.op == "call_module"
                    else f"{n.op} {getattr(n.target, '__name__', n.target)}")
            msg = _real_error(self, n) or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise ShapePropError(
                f"shape propagation failed at node '{n.name}', {what}: {msg}. "
                "Check that the example inputs have the shapes and dtypes the model expects."
            ) from None
        n.meta["val"] = out
        return out

    def _param_meta(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in self._tensor_cache:
            self._tensor_cache[name] = _meta(t)
        return self._tensor_cache[name]

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return self._param_meta(target, v) if isinstance(v, torch.Tensor) else v

    def call_function(self, target, args, kwargs):
        # NB: exported graphs carry factory calls with ``device=cpu`` (arange, ones, scalar_tensor);
        # on a meta run they must make meta tensors, or they meet meta operands and fail
        if "device" in kwargs:
            kwargs = {**kwargs, "device": "meta"}
        if any(isinstance(a, torch.device) for a in args):  # aten.to.device(x, device, dtype)
            args = tuple(_META if isinstance(a, torch.device) else a for a in args)
        fast = _fast_binary(target, args, kwargs)
        if fast is None:
            fast = _fast_inplace(target, args, kwargs)
        if fast is None:
            fast = _fast_cat(target, args, kwargs)
        if fast is None:
            fast = _grouped_mm_meta(target, args, kwargs)
        if fast is not None:
            return fast
        return super().call_function(target, args, kwargs)  # a view refused by meta strides: run_node

    def call_module(self, target, args, kwargs):
        # fx.Interpreter's name -> module dict (fetch_attr walks the path with hasattr/getattr)
        mod = self.submodules[target] if target in self.submodules else self.fetch_attr(target)
        fast = _fast_module_call(self, target, mod, args, kwargs)
        if fast is not None:
            return fast
        state = {k: _meta(v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
        return functional_call(mod, state, tuple(args), dict(kwargs), tie_weights=False, strict=False)


class RealProp(fx.Interpreter):
    """Records ``node.meta['val']`` (meta copies) from a run on the real inputs and weights.

    # NB: buffers are read as copies, so a batch norm in training mode or any in-place update of
    # a buffer leaves the model's own buffers as they were
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self._params = {id(p) for p in gm.parameters()}

    def run(self, *args, **kwargs):
        with torch.no_grad():
            return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["val"] = meta_like(out)
        return out

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return v.clone() if isinstance(v, torch.Tensor) and id(v) not in self._params else v

    def call_module(self, target, args, kwargs):
        mod = self.submodules[target] if target in self.submodules else self.fetch_attr(target)
        state = {k: v.clone() for k, v in mod.named_buffers()}
        return functional_call(mod, state, tuple(args), dict(kwargs), tie_weights=False, strict=False)


_GROUPED_MM = tuple(t for t in (getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None),
                                 getattr(getattr(torch.ops.aten, "_grouped_mm", None), "default", None)) if t is not None)


def _grouped_mm_meta(target, args, kwargs):
    """[S, K] x [G, K, N] grouped mm on meta: [S, N].

    # NB: torch's meta kernel accepts bfloat16/float16 only, while the CPU kernel (what the model
    # runs) takes float32 too
    """
    if target not in _GROUPED_MM or len(args) < 2:
        return None
    a, b = args[0], args[1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device.type == "meta"
            and a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1]):
        return None
    return torch.empty(a.shape[0], b.shape[2], dtype=kwargs.get("out_dtype") or a.dtype, device=_META)


# NB: broadcasting arithmetic and adaptive pooling on meta go through Python reference
# implementations (5-10 ms a call); their shapes are computed here when the answer is plain
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}


def _contiguous_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta" and x.is_contiguous()


def _broadcast(*shapes) -> tuple | None:
    """The broadcast of int shapes, or None when they do not broadcast (torch then raises).

    # NB: torch.broadcast_shapes goes through Python references, ~0.1 ms a call
    """
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, d in enumerate(s, n - len(s)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    return None
                out[i] = d
    return tuple(out)


def _dense_strides(x: torch.Tensor) -> tuple | None:
    """``x``'s strides if ``x`` is a permutation of a contiguous tensor (what an elementwise
    result copies), else None."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    expect, acc = [0] * x.dim(), 1
    for d in reversed(order):
        expect[d] = acc
        acc *= x.shape[d]
    return x.stride() if tuple(expect) == x.stride() else None


def _undeciding(t: torch.Tensor, shape: torch.Size) -> bool:
    """Whether ``t`` broadcast to ``shape`` has at most one axis of size > 1: TensorIterator then
    never takes its layout into account when it orders the result's axes (a stride of 0 on one
    side of every comparison)."""
    k = len(shape) - t.dim()
    return sum(1 for d, s in enumerate(t.shape) if s != 1 and shape[k + d] != 1) <= 1


def _meta_operands(a, b) -> list | None:
    """The tensor operands of ``a (op) b`` when each operand is a non-bool meta tensor or a Python
    int/float (not a bool), else None (torch then decides, and raises its own errors)."""
    tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    if not all(t.device.type == "meta" and t.dtype != torch.bool for t in tensors) or \
            not all(isinstance(t, (torch.Tensor, int, float)) and not isinstance(t, bool) for t in (a, b)):
        return None
    return tensors


def _fast_binary(target, args, kwargs):
    """``a + b`` (and -, *, /) on meta tensors or Python numbers, without Python decompositions.

    Contiguous operands give a contiguous result. Operands of the full result shape with equal
    strides that permute a contiguous layout give those strides to the result when every other
    operand is a number or broadcasts along all but one axis (a layer scale, a bias); anything
    else is left to torch.
    """
    if target not in _BINARY or kwargs or len(args) != 2:
        return None
    a, b = args
    tensors = _meta_operands(a, b)
    if not tensors:
        return None
    if target in (operator.truediv, torch.div) and not all(t.is_floating_point() for t in tensors):
        return None  # integer division promotes: leave it to torch
    shape = _broadcast(*(t.shape for t in tensors))
    if shape is None:
        return None
    dtype = torch.result_type(a, b)
    if all(t.is_contiguous() for t in tensors):
        return torch.empty(shape, dtype=dtype, device=_META)
    full = [t for t in tensors if tuple(t.shape) == shape]
    if not full or any(t.stride() != full[0].stride() for t in full) or \
            not all(tuple(t.shape) == shape or _undeciding(t, shape) for t in tensors):
        return None
    strides = _dense_strides(full[0])
    return None if strides is None else torch.empty_strided(shape, strides, dtype=dtype, device=_META)


_CAT = {torch.cat, torch.ops.aten.cat.default}


def _fast_cat(target, args, kwargs):
    """``torch.cat`` of contiguous meta tensors of one dtype: a contiguous result, by shape arithmetic.

    # NB: cat's meta kernel is Python (about 0.4 ms a call: densenet121's 62 concats were
    # most of its shape pass); empty, mixed-dtype or non-contiguous inputs are left to torch
    """
    if target not in _CAT or len(args) > 2 or set(kwargs) - {"dim"}:
        return None
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or type(dim) is not int:
        return None
    first = tensors[0]
    if not all(_contiguous_meta(t) and t.dtype == first.dtype and t.dim() == first.dim() and t.numel() > 0
               for t in tensors):
        return None
    nd = first.dim()
    if not -nd <= dim < nd:
        return None
    dim %= nd
    shape = list(first.shape)
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:] for t in tensors):
        return None
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device=_META)


def _fast_inplace(target, args, kwargs):
    """``a += b`` (and -=, *=, /=) on a meta tensor: ``a`` itself, when ``b`` broadcasts to it and
    the result's dtype casts to ``a``'s (torch's own checks), else None."""
    if target not in INPLACE_ARITHMETIC or kwargs or len(args) != 2:
        return None
    a, b = args
    if not isinstance(a, torch.Tensor) or _meta_operands(a, b) is None:
        return None
    if isinstance(b, torch.Tensor) and _broadcast(a.shape, b.shape) != tuple(a.shape):
        return None
    if target is operator.itruediv and not a.is_floating_point():
        return None
    return a if torch.can_cast(torch.result_type(a, b), a.dtype) else None


def _fast_module_call(interp: "MetaProp", target: str, mod, args, kwargs):
    """Conv, Linear and adaptive pooling on meta without functional_call or Python decompositions."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    if type(mod) in (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool1d) and _contiguous_meta(args[0]):
        x, k = args[0], (2 if isinstance(mod, torch.nn.AdaptiveAvgPool2d) else 1)
        size = mod.output_size if isinstance(mod.output_size, (tuple, list)) else (mod.output_size,) * k
        if x.dim() < k + 1 or len(size) != k:
            return None
        size = tuple(x.shape[-k + i] if s is None else s for i, s in enumerate(size))
        return torch.empty((*x.shape[:-k], *size), dtype=x.dtype, device=_META)
    x = args[0]
    if type(mod) is torch.nn.Linear:
        if x.device.type != "meta" or x.dim() < 1 or x.shape[-1] != mod.in_features or x.dtype != mod.weight.dtype:
            return None  # torch raises its own error
        # NB: F.linear on meta decomposes into Python addmm/broadcast references (4 ms a call on a
        # 4-d input); its result is always a fresh contiguous tensor
        return torch.empty((*x.shape[:-1], mod.out_features), dtype=x.dtype, device=_META)
    if type(mod) in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
        shape = _conv_shape(mod, x)
        if shape is not None:
            return torch.empty(shape, dtype=x.dtype, device=_META)
        w = interp._param_meta(f"{target}.weight", mod.weight)
        b = interp._param_meta(f"{target}.bias", mod.bias) if mod.bias is not None else None
        return mod._conv_forward(x, w, b)
    return None


def _conv_shape(mod, x: torch.Tensor) -> tuple | None:
    """Output shape of a Conv{1,2,3}d on a meta input of the right rank and channels, else None."""
    k = len(mod.kernel_size)
    # NB: torch's meta kernel returns a contiguous result for any input layout (channels_last
    # included), so the formula's contiguous result is what running it would give
    if x.device.type != "meta" or x.dim() != k + 2 or x.shape[1] != mod.in_channels or \
            x.dtype != mod.weight.dtype or not mod.weight.is_contiguous():
        return None  # unbatched inputs, channels_last weights, mismatches: torch's meta kernel decides
    if mod.padding == "same":
        return (x.shape[0], mod.out_channels, *x.shape[2:])
    pad = (0,) * k if mod.padding == "valid" else mod.padding
    out = []
    for i in range(k):
        n = (x.shape[2 + i] + 2 * pad[i] - mod.dilation[i] * (mod.kernel_size[i] - 1) - 1) // mod.stride[i] + 1
        if n <= 0:
            return None  # input smaller than the kernel: torch's error
        out.append(n)
    return (x.shape[0], mod.out_channels, *out)


def _real_error(interp: "MetaProp", n: fx.Node) -> str | None:
    """Re-run a failing node on real zeros (on a copy of its module) for torch's clearer message."""
    import copy

    def real(x):
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            return torch.zeros(x.shape, dtype=x.dtype)
        return x

    try:
        args, kwargs = interp.fetch_args_kwargs_from_env(n)
        args, kwargs = tree_map(real, args), tree_map(real, kwargs)
        with torch.no_grad():
            if n.op == "call_module":
                copy.deepcopy(interp.fetch_attr(n.target))(*args, **kwargs)
            elif n.op == "call_function":
                n.target(*args, **kwargs)
            else:
                return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def spec_leaves(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list | None:
    """The values of ``gm``'s placeholders for ``gm(*args, **kwargs)``, flattened by its pytree input spec
    (torch.export's: a nested input, ``added_cond_kwargs={"resolution": None, ...}``, is one placeholder
    per leaf), or None when ``gm`` has no such spec. Raises when the inputs do not fit the spec."""
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    if spec is None:
        return None
    return list(fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), spec))


def annotate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> fx.GraphModule:
    """Annotate every node of ``gm`` with ``meta['val']`` (meta tensors) from example args/kwargs."""
    kwargs = kwargs or {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        flat = spec_leaves(gm, args, kwargs)
    except Exception:  # noqa: BLE001 - inputs of another structure: matched by name below
        flat = None
    if flat is None or len(flat) != len(placeholders):
        flat = list(args)
        for n in placeholders[len(args):]:
            if n.target in kwargs:
                flat.append(kwargs[n.target])
            elif n.args:
                flat.append(n.args[0])
            else:
                raise ShapePropError(f"no example value for input '{n.target}': pass it in example_inputs")
    try:
        MetaProp(gm).run(*meta_like(tuple(flat)))
    except ShapePropError as e:
        if not _real_run_possible(gm, flat):
            raise
        try:
            RealProp(gm).run(*flat)
        except Exception:  # noqa: BLE001 - the meta run's error names the node and says what to check
            raise e from None
        log.info("shape propagation ran on the real inputs and weights: the meta run stopped at %s",
                 str(e).split(": ", 1)[0])
    return gm


def _real_run_possible(gm: fx.GraphModule, flat: list) -> bool:
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    tensors += list(gm.parameters()) + list(gm.buffers())
    return not any(t.device.type == "meta" for t in tensors)
