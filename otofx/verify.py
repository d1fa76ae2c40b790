"""Verification, one module for every method: is a compressed graph or model exact?

OTO.md's exactness: a compressed model equals the full model with its removed rows zeroed, to
``rtol`` (1e-4) relative in float32, and to a dtype-fitting bound in half precision
(:func:`outputs_close` says why). Every method (OTO's compress, the pipeline's ``Verify`` and its
``verify=True`` runner, the ``torch.compile`` backend, SCOP's pruning, SLB, JointRD) checks its
rewrites with these helpers:

    run_eval(module, args, kwargs)      outputs in eval mode under no_grad (training flags restored)
    fresh_inputs(args, kwargs)          new containers around the same tensors, for one call
    compare(ref, candidate, ...)        relative error; VerificationError past the tolerance
    compare_all(ref, candidate, sets)   compare on every input set (the example, a second shape)
    replay_decisions(ref, cand, ...)    equal once decisions on tied values are taken as the reference took them
    narrow_outputs(ref, got, keep)      the reference's free outputs at the positions a compressed model keeps
    input_sets(state)                   the input sets of a pipeline State
    first_wrong_module(ref, cand, ...)  where a re-sized copy first goes wrong (a module's name)
    outputs_close(a, b, rtol)           the exactness test itself, over every tensor leaf
    fitted_rtol / contraction_depth / compute_dtype / unit_roundoff / tf32_in_use   its tolerance
    eval_mode(module)                   every submodule in eval mode, flags restored afterwards

Internals:
    * Verification holds float32 to ``rtol`` (1e-4); a float16/bfloat16 model gets
      ``2 * unit roundoff * sqrt(contraction depth)``, and so does a float32 model on CUDA while
      TF32 is allowed (cuDNN's default for convolutions), with float16's unit roundoff: TF32
      keeps 10 mantissa bits (:func:`tf32_in_use`).
    * Every run starts from the random state ``RUN_SEED``: a forward that draws noise draws the
      same in the reference and the candidate (their draws follow the same order).
    * ``first_wrong_module`` compares each module call's outputs by their sums of ``|x|`` and
      ``x**2``, which removing channels that are zero in the reference leaves as they are: no
      channel map is needed to compare a narrower activation with the full one.
    * A free output (``OTO(..., free_outputs=...)``) comes back without its removed channels, which
      are zero in the reference: ``keep`` (``passes.prune.output_keeps``: flat output index -> axis ->
      kept positions) indexes the reference's leaf where the candidate's is that much narrower;
      every other leaf is compared whole.
    * # NB: ``eval_mode`` sets ``training`` on every submodule instead of calling ``eval()``: a
      torch.export GraphModule raises on ``eval()``.
    * Decisions (:func:`replay_decisions`): a ``TorchDispatchMode`` records every op that turns float
      values into a discrete result (a comparison, argmax, a sort's or top-k's indices, NMS, a float
      cast to an integer, ``.item()``) in the reference's run, and the candidate's run returns the
      recorded result at the same place in the sequence where the values read agree to the
      tolerance. Only after a mismatch (or a candidate that raised): a passing model pays nothing.
"""
from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from otofx.errors import VerificationError
from otofx.fxcompat import is_op_overload, op_schema

log = logging.getLogger("otofx")


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Put every submodule in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False  # NB: not module.eval(): a torch.export GraphModule raises on eval()
        yield module
    finally:
        for m, f in flags:
            m.training = f


# NB: contractions (the ops whose reductions change length when rows go) by their op name: fx
# functions and methods, leaf modules, and torch.export's aten overloads ("aten::addmm")
_CONTRACTION = re.compile(r"_*(linear|bilinear|conv\w*|convolution\w*|r?matmul|mm|bmm|addmm|addbmm|baddbmm"
                          r"|einsum|tensordot|\w*scaled_dot_product\w*|\w*attention\w*)_*")
_CONTRACTION_MODULES = (torch.nn.Linear, torch.nn.Bilinear, torch.nn.modules.conv._ConvNd)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of ``dtype``: the largest relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def _contractions_in(module: torch.nn.Module) -> int:
    """How many contractions a leaf module runs in sequence (upper bound: all of them)."""
    if isinstance(module, _CONTRACTION_MODULES):
        return 1
    if isinstance(module, torch.nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return 4  # input projection, q.k, weights.v, output projection
    return sum(1 for m in module.modules() if isinstance(m, _CONTRACTION_MODULES))


def contraction_depth(module: torch.nn.Module) -> int:
    """The most contractions (matmul, linear, conv, attention ...) on one path from input to output.

    From the graph of a GraphModule (longest path, nodes are in topological order); for another
    module, the count of its Linear/Conv layers (an upper bound). At least 1.
    """
    if not isinstance(module, fx.GraphModule):
        return max(1, _contractions_in(module))
    depth: dict = {}
    deepest = 0
    for n in module.graph.nodes:
        d = max((depth[a] for a in n.all_input_nodes), default=0)
        if n.op == "call_module":
            d += _contractions_in(module.get_submodule(n.target))
        elif n.op in ("call_function", "call_method"):
            t = n.target
            name = t if isinstance(t, str) else (op_schema(t).name.split("::")[-1] if is_op_overload(t)
                                                  else getattr(t, "__name__", ""))
            d += 1 if _CONTRACTION.fullmatch(name) else 0
        depth[n] = d
        deepest = max(deepest, d)
    return max(1, deepest)


def compute_dtype(*modules) -> torch.dtype | None:
    """The least precise floating dtype among the parameters and buffers of ``modules`` (None if none)."""
    worst = None
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and (worst is None or unit_roundoff(t.dtype) > unit_roundoff(worst)):
                worst = t.dtype
    return worst


def fitted_rtol(rtol: float, dtype: torch.dtype | None, depth: int = 1) -> float:
    """The tolerance for outputs computed in ``dtype`` through ``depth`` contractions in sequence.

    ``rtol`` itself for float32 and float64 (and non-floating outputs); for a dtype less precise
    than float32 (float16, bfloat16) ``max(rtol, 2 * u * sqrt(depth))``, ``u`` its unit roundoff.
    See :func:`outputs_close` for why.
    """
    if dtype is None or not dtype.is_floating_point or unit_roundoff(dtype) <= unit_roundoff(torch.float32):
        return rtol
    return max(rtol, 2.0 * unit_roundoff(dtype) * math.sqrt(max(1, depth)))


def outputs_close(a, b, rtol: float = 1e-4, *, dtype: torch.dtype | None = None, depth: int = 1) -> tuple[bool, float]:
    """OTO.md's exactness: max|a - b| <= tol * max(1, max|a|) over every tensor leaf (a NaN or infinity
    of ``a`` must be one of ``b`` too, at the same place).

    ``tol`` is ``rtol`` (1e-4) for float32/float64 leaves: exact up to float32 reduction order.
    Half precision cannot meet that: a compressed model sums the same non-zero terms as the full
    one, but its contractions are shorter, so the kernels block and order the sums differently and
    an output rounded to bfloat16 (unit roundoff u = 2^-8) or float16 (2^-11) lands one ulp apart now
    and then; later layers carry those flips on. So for a leaf in half precision, or every leaf
    when ``dtype`` (the dtype the model computes in, see :func:`compute_dtype`) is half precision,
    ``tol = max(rtol, 2 * u * sqrt(depth))`` (:func:`fitted_rtol`), ``depth`` the number of
    contractions on the longest path (:func:`contraction_depth`):

    * one rounding of a contraction's output is off by at most u relative, and the differences of
      successive contractions on a path add like a random walk (independent signs): sqrt(depth) u
      is its standard deviation, 2x covers the max over the output elements. Measured on LLaMA
      (1.1B, 22 layers, depth 111: error 0.02 = 0.49 u sqrt(depth); 4 layers: 0.33) and resnet18
      (0.23), float16 0.12-0.40: the bound is 4x above the worst.
    * It still catches wrong rewrites: removing a non-zero row or slicing the wrong indices moves
      the outputs by far more than rounding does (removing the wrong half of each group's rows:
      0.3-1.4 on the same models, against tolerances of 0.02-0.08); an error below the rounding
      noise of the dtype cannot be told from it by any check in that dtype.
    * Checking in float32 instead would need a float32 copy of the weights (2x a bfloat16 model,
      against the memory bound of compress) and graphs captured with their dtype baked in
      (``x.to(torch.bfloat16)`` in an exported graph) would round to half precision anyway.
    """
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    if len(fa) != len(fb):
        return False, float("inf")
    worst, ok = 0.0, True
    for x, y in zip(fa, fb):
        if not isinstance(x, torch.Tensor):
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return False, float("inf")
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False, float("inf")
            continue
        tol = fitted_rtol(rtol, dtype if dtype is not None else x.dtype, depth)
        if dtype is not None:
            tol = max(tol, fitted_rtol(rtol, x.dtype, depth))
        x, y = x.double(), y.double()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            # NB: a NaN or infinity the reference computes (an uninitialised weight, a fully masked
            # softmax) is matched where the other computes the same; the numbers around it are compared
            same = (torch.isnan(x) & torch.isnan(y)) | (x == y)
            if not bool(same[~finite].all()):
                return False, float("inf")
            x, y = x[finite], y[finite]
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        scale = max(1.0, x.abs().max().item() if x.numel() else 0.0)
        if diff != diff:  # NB: a NaN the reference does not have
            return False, float("inf")
        worst = max(worst, diff / scale)
        ok &= diff <= tol * scale
    return ok, worst


def tf32_in_use(outputs) -> bool:
    """Whether float32 contractions that gave ``outputs`` may have run in TF32: a CUDA tensor among
    them and TF32 allowed for cuDNN convolutions (torch's default) or cuBLAS matrix products."""
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_flatten(outputs)[0]):
        return False
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


# the random state every verification run starts from
RUN_SEED = 0


def _cuda_devices(module: torch.nn.Module, args: tuple, kwargs: dict | None) -> list:
    leaves = tree_flatten((args, kwargs or {}))[0] + list(module.parameters()) + list(module.buffers())
    return sorted({t.device.index or 0 for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda})


def fresh_inputs(args: tuple, kwargs: dict | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every list, tuple and dict in them new, their tensors and other leaves the
    same objects: what one call of a model may write into without changing the example.

    # NB: a forward that adds its results to the dict it was given (sentence-transformers' modules
    # ``features.update(...)``) would otherwise change the example for every later call: the exported
    # graph then refuses the grown dict, and the user's own inputs come back changed"""
    return tree_map(lambda t: t, tuple(args)), tree_map(lambda t: t, dict(kwargs or {}))


def run_eval(module: torch.nn.Module, args: tuple, kwargs: dict | None = None):
    """``module(*args, **kwargs)`` in eval mode under ``no_grad`` (training flags restored), from the
    random state ``RUN_SEED`` on the devices it runs on (the caller's state is left as it was)."""
    devices = _cuda_devices(module, args, kwargs)
    # NB: a forward that draws noise in eval mode (VITS's prior sample, a ``randn_like``) must draw
    # the same numbers in the reference and in the candidate, or no compressed model verifies
    with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(module):
        torch.random.default_generator.manual_seed(RUN_SEED)
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(RUN_SEED)
        args, kwargs = fresh_inputs(args, kwargs)
        return module(*args, **kwargs)


def narrow_outputs(ref, got, keep: dict | None):
    """``ref`` with each free output's leaf (``keep``: flat output index -> axis -> kept positions, see
    ``passes.prune.output_keeps``) indexed to the kept positions along every axis where ``got``'s leaf
    has exactly that many and ``ref``'s more; every other leaf as it is."""
    if not keep:
        return ref
    fr, spec = tree_flatten(ref)
    fg, _ = tree_flatten(got)
    if len(fr) != len(fg):
        return ref
    for i, axes in keep.items():
        if i >= len(fr) or not isinstance(fr[i], torch.Tensor) or not isinstance(fg[i], torch.Tensor):
            continue
        t = fr[i]
        for d, idx in axes.items():
            if d < min(t.dim(), fg[i].dim()) and fg[i].shape[d] == len(idx) != t.shape[d]:
                t = t.index_select(d, idx.to(t.device))
        fr[i] = t
    return tree_unflatten(fr, spec)


def compare(reference, candidate: torch.nn.Module, args: tuple, kwargs: dict | None, rtol: float, what: str,
            inputs: str = "the example inputs", keep: dict | None = None,
            source: torch.nn.Module | None = None) -> float:
    """Relative error of ``candidate`` against ``reference`` (outputs or a module); raises on a mismatch.

    ``rtol`` holds for float32 models; a model computing in float16/bfloat16 gets the dtype's
    tolerance for its contraction depth (:func:`outputs_close`, :func:`fitted_rtol`). ``inputs``
    names ``args``/``kwargs`` in the error (the example inputs or a second shape). ``keep``: the
    free outputs' kept positions (:func:`narrow_outputs`). Outputs that differ only by decisions taken
    on values equal to rounding (a sort, top-k or NMS on tied scores) pass, with a warning: see
    :func:`replay_decisions` (``source``: the reference module when ``reference`` is its outputs).
    """
    full = run_eval(reference, args, kwargs) if isinstance(reference, torch.nn.Module) else reference
    source = reference if isinstance(reference, torch.nn.Module) else source
    taken = ()
    try:
        got = run_eval(candidate, args, kwargs)
    except Exception as e:
        # NB: a decision that fell the other way on tied values may end in an assertion of the graph
        # (export's on a data-dependent size): the candidate runs again with the reference's decisions
        got, taken = _replayed_run(e, source, candidate, args, kwargs, rtol)
    ref = narrow_outputs(full, got, keep)
    dtype = compute_dtype(reference, candidate)
    name = str(dtype)
    if dtype == torch.float32 and tf32_in_use(got):
        # NB: TF32 rounds the inputs of float32 convolutions and matrix products to a 10-bit
        # mantissa, float16's: the float32 model computes with float16's unit roundoff there
        dtype, name = torch.float16, "float32 with TF32 on CUDA"
    graph = reference if isinstance(reference, fx.GraphModule) else candidate
    depth = contraction_depth(graph) if dtype is not None and fitted_rtol(rtol, dtype) != rtol else 1
    ok, err = outputs_close(ref, got, rtol, dtype=dtype, depth=depth)
    if not ok and source is not None and not taken:
        replayed = replay_decisions(source, candidate, args, kwargs, rtol, dtype, depth)
        if replayed is not None:
            got, taken = replayed
            ok, err = outputs_close(narrow_outputs(full, got, keep), got, rtol, dtype=dtype, depth=depth)
    if ok and taken:
        _replayed(what, inputs, err, taken)
    if not ok:
        tol = fitted_rtol(rtol, dtype, depth)
        why = "" if tol == rtol else f" ({name}: 2 * unit roundoff * sqrt({depth} contractions deep))"
        off = (f"relative error {err:.3g} > {tol:.3g}{why}" if err != float("inf") else
               "an output differs in its structure, shape, integer values or where it is NaN or infinite")
        raise VerificationError(
            f"{what} differs from the reference graph on {inputs} ({off}). If the pass is otofx's, this is a "
            "bug in otofx: please report it with the model.")
    return err


def _replayed_run(error: Exception, source, candidate, args, kwargs, rtol) -> tuple:
    """``(outputs, ops replayed)`` of ``candidate`` run with ``source``'s decisions (see
    :func:`replay_decisions`) after its own run raised ``error``, which is raised again when there is
    no reference module to replay, no decision fell differently, or the replayed run raises too."""
    replayed = None
    if source is not None:
        try:
            replayed = replay_decisions(source, candidate, args, kwargs, rtol, compute_dtype(source, candidate))
        except Exception:  # noqa: BLE001 - the candidate's own error is the one to report
            replayed = None
    if replayed is None:
        raise error
    return replayed


def input_sets(state) -> list:
    """``(args, kwargs, name)`` of every input set verification runs: the example inputs, then
    ``state.more_inputs`` (the export front-end's second shape: see ``otofx.capture.second_inputs``)."""
    out = [(tuple(state.args), dict(state.kwargs), "the example inputs")]
    for a, k in state.more_inputs:
        out.append((tuple(a), dict(k), f"second-shape inputs ({_shapes(a, k)})"))
    return out


def _shapes(args, kwargs) -> str:
    leaves = tree_flatten((args, kwargs))[0]
    return ", ".join("x".join(map(str, t.shape)) for t in leaves if isinstance(t, torch.Tensor))


def compare_all(reference, candidate: torch.nn.Module, sets: list, rtol: float, what: str,
                keep: dict | None = None, source: torch.nn.Module | None = None) -> float:
    """:func:`compare` on every ``(args, kwargs, name)`` of ``sets`` (``reference``: a module, or
    one output per set); the worst relative error. ``keep``, ``source``: :func:`compare`'s."""
    worst = 0.0
    for i, (a, k, name) in enumerate(sets):
        ref = reference[i] if isinstance(reference, list) else reference
        worst = max(worst, compare(ref, candidate, a, k, rtol, what, name, keep, source))
    return worst


# ---------------------------------------------------------------------------------------------
# Decisions on float values
# ---------------------------------------------------------------------------------------------


def _floats(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _is_decision(func, args, kwargs, out) -> bool:
    """An op that turns float values into a discrete result: a comparison, an argmax, a sort's or
    top-k's indices, NMS's kept boxes, a float cast to an integer, or a Python number read off a
    float tensor (``.item()``, which Python code may branch on)."""
    if func is torch.ops.aten._local_scalar_dense.default:
        return bool(_floats(args))
    if not _floats((args, kwargs)):
        return False
    return any(isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()
               for t in tree_flatten(out)[0])


def _same(a, b) -> bool:
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _copy(tree):
    flat, spec = tree_flatten(tree)
    return tree_unflatten([t.clone() if isinstance(t, torch.Tensor) else t for t in flat], spec)


class _Decisions(TorchDispatchMode):
    """Records the decisions a forward takes on float values (``recorded`` None), or replays
    recorded ones in another forward: where the op at the same place in the sequence reads float
    values that agree with the recorded ones to the tolerance (``close``), the recorded result is
    returned; ``taken`` names the ops whose own result differed."""

    def __init__(self, recorded: list | None = None, close=None):
        super().__init__()
        self.replay = recorded is not None
        self.recorded = recorded if recorded is not None else []
        self.close = close
        self.at = 0
        self.taken: list = []
        self.lost = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _is_decision(func, args, kwargs, out):
            return out
        if not self.replay:
            self.recorded.append((func, _copy(_floats((args, kwargs))), _copy(out)))
            return out
        if self.lost or self.at >= len(self.recorded) or self.recorded[self.at][0] is not func:
            self.lost = True  # NB: another sequence of decisions: nothing after this point is replayed
            return out
        _, inputs, before = self.recorded[self.at]
        self.at += 1
        if _same(before, out) or not self.close(inputs, _floats((args, kwargs))):
            return out
        self.taken.append(func.__name__.split(".")[0])
        return _copy(before)


_COLLECTORS: list = []


@contextmanager
def collected_replays():
    """Collect what :func:`compare` says of replayed decisions (see :func:`say_replays`) instead of
    logging each: one compression verifies several times (after each pass, then the model)."""
    notes: list = []
    _COLLECTORS.append(notes)
    try:
        yield notes
    finally:
        _COLLECTORS.remove(notes)


def _replayed(what: str, inputs: str, err: float, taken: list) -> None:
    if _COLLECTORS:
        _COLLECTORS[-1].append((what, inputs, err, tuple(taken)))
    else:
        say_replays([(what, inputs, err, tuple(taken))])


def say_replays(notes: list) -> None:
    """One warning for the decisions :func:`compare` replayed (``(what, inputs, error, ops)`` each)."""
    if not notes:
        return
    what, inputs, err, taken = notes[-1]
    ops = sorted({op for *_, t in notes for op in t})
    log.warning("otofx: %s agrees with the reference on %s (relative error %.2g) once %d decision(s) on float "
                "values (%s) are taken as the reference took them. They fell the other way on values that agree "
                "to rounding (ties or near-ties: several items scored alike), so on such inputs its own outputs "
                "pick other, equally scored items than the full model's", what, inputs, err, len(taken),
                ", ".join(ops))


def replay_decisions(reference: torch.nn.Module, candidate: torch.nn.Module, args: tuple, kwargs: dict | None,
                     rtol: float, dtype: torch.dtype | None = None, depth: int = 1) -> tuple | None:
    """``(outputs, the ops replayed)`` of ``candidate`` run with every decision it takes on float values
    that agree with the reference's to the tolerance taken as ``reference`` took it; None when no
    decision fell differently. The caller compares those outputs with the reference's.

    A detector's NMS, a top-k over scores or a sort picks among tied or near-tied values by their
    last bits; a compressed model sums the same non-zero terms in another order and may pick other,
    equally scored items, and then every box after that differs. Replaying the reference's
    decisions tells such a model from a wrong one: the values each decision reads are still
    compared (a decision on values off by more than rounding is not replayed), and so is everything
    computed after it.
    """
    def close(a, b) -> bool:
        if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            return False
        return outputs_close(a, b, rtol, dtype=dtype, depth=depth)[0]

    record = _Decisions()
    with record:
        run_eval(reference, args, kwargs)
    if not record.recorded:
        return None
    replay = _Decisions(record.recorded, close)
    with replay:
        got = run_eval(candidate, args, kwargs)
    return (got, replay.taken) if replay.taken else None


def _module_calls(module: torch.nn.Module, args: tuple, kwargs: dict | None) -> tuple:
    """Every submodule call of ``module(*args, **kwargs)`` (``run_eval``) in the order the calls
    finish, as ``(name, sums)`` with ``sums`` the ``(sum |x|, sum x**2)`` of each floating tensor it
    returns; and the name of the innermost call in progress when the forward raised (else None)."""
    names: dict = {}
    for name, m in module.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)  # NB: a shared module answers to its first name
    calls, stack, handles = [], [], []

    def before(m, _args):
        stack.append(names[id(m)])

    def after(m, _args, out):
        stack.pop()
        sums = tuple((float(t.detach().double().abs().sum()), float(t.detach().double().square().sum()))
                     for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point())
        calls.append((names[id(m)], sums))

    seen = set()
    for m in module.modules():
        if id(m) not in seen:
            seen.add(id(m))
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    raised = None
    try:
        run_eval(module, args, kwargs)
    except Exception:  # noqa: BLE001 - where it raised is the answer
        raised = stack[-1] if stack else ""
    finally:
        for h in handles:
            h.remove()
    return calls, raised


@dataclass(frozen=True)
class Blame:
    """Where a re-sized copy first goes wrong: ``module`` (a submodule's name, ``""`` for the top
    module), and ``after``, the last call inside it that finished before (its child whose output the
    failing code read), or None."""

    module: str
    after: str | None = None


def _inside(name: str, scope: str) -> bool:
    return scope == "" or name.startswith(scope + ".")


def first_wrong_module(reference: torch.nn.Module, candidate: torch.nn.Module, args: tuple,
                       kwargs: dict | None = None, rtol: float = 1e-3) -> Blame | None:
    """Where ``candidate`` (a re-sized copy of ``reference``, same module names) first goes wrong on
    ``args``/``kwargs``: the innermost call in progress when its forward raises, else the first call
    (in the order calls finish) whose outputs' sums of ``|x|`` and ``x**2`` differ from the
    reference's by more than ``rtol``; None when every call agrees.

    A heuristic for search, not a check: removed channels that are zero in the reference leave these
    sums unchanged, so a narrower activation compares with the full one without a channel map; a
    copy that rescales a width on purpose (a weightless RMS norm's refold) reads as wrong there."""
    got, raised = _module_calls(candidate, args, kwargs)
    if raised is not None:
        last = got[-1][0] if got and got[-1][0] != raised and _inside(got[-1][0], raised) else None
        return Blame(raised, last)
    ref, _ = _module_calls(reference, args, kwargs)
    count: dict = {}
    at = {}
    for name, sums in ref:
        k = count[name] = count.get(name, 0) + 1
        at[(name, k)] = sums
    count.clear()
    for j, (name, sums) in enumerate(got):
        k = count[name] = count.get(name, 0) + 1
        want = at.get((name, k))
        wrong = want is None or len(want) != len(sums)
        # NB: written so that a NaN on either side counts as wrong
        wrong = wrong or any(not (abs(a1 - a2) <= rtol * max(a1, 1e-30) and abs(s1 - s2) <= rtol * max(s1, 1e-30))
                             for (a1, s1), (a2, s2) in zip(want, sums))
        if wrong:
            last = got[j - 1][0] if j and _inside(got[j - 1][0], name) and got[j - 1][0] != name else None
            return Blame(name, last)
    return None


__all__ = ["eval_mode", "unit_roundoff", "contraction_depth", "compute_dtype", "fitted_rtol", "outputs_close",
           "tf32_in_use", "run_eval", "compare", "input_sets", "compare_all", "narrow_outputs",
           "first_wrong_module", "Blame"]
