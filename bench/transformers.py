"""Transformers: otofx groups (attention heads, MLP widths), exactness and CPU latency, next to the peers.

Coverage (``--coverage``, on by default). Random weights, eval mode, then :func:`randomise`: BN
statistics, every bias, and every parameter initialised to one constant (LayerNorm/RMSNorm weights,
class tokens, Swin V2 logit scales) drawn at random, so an exactness check is not vacuous.

* torchvision ``vit_b_16`` (``image_size=32``, input 1x3x32x32), ``vit_b_32`` (``image_size=64``,
  1x3x64x64), ``swin_t`` and ``swin_v2_t`` (1x3x64x64), ``maxvit_t`` (1x3x224x224: its 7x7 windows
  need 224); the inputs of ``tests/test_transformers.py``.
* Hugging Face ``BertModel``, ``GPT2Model``, ``ViTModel``, ``LlamaModel`` (grouped-query attention:
  4 query / 2 key-value heads), ``T5EncoderModel``, ``DistilBertModel`` from the small configs of
  ``tests/test_transformers.py::_hf`` (hidden 32, 4 heads of 8, MLP 64 or 128, 2 layers), built from
  their config classes (nothing downloaded); input ``input_ids`` 2x16 (ViT: 2x3x32x32). The full
  model's reference call gets ``use_cache=False`` when its config has ``use_cache`` (otofx captures
  HF models without their KV cache).

Columns:

* ``groups``: otofx groups; ``head grp``/``head rows``: groups that hold attention heads (some
  parameter of an attention projection -- name with ``attn``, ``attention``, ``query``, ``q_proj``,
  ``qkv``, ``in_proj``, ``.q.`` -- has ``head_dim`` or a multiple of it per row); ``MLP grp``/``MLP
  rows``: groups holding the output rows of an MLP expansion layer (``mlp``, ``intermediate``,
  ``c_fc``, ``wi``, ``gate_proj``, ``up_proj``, ``lin1``) that are not head groups; ``rows``: all rows.
* ``out ch``: output channels of every conv/linear layer (GPT-2's ``Conv1D`` by its dim 1;
  ``nn.MultiheadAttention``'s ``in_proj_weight`` and ``out_proj``), except the torchvision
  classifier (the last ``nn.Linear``); ``otofx ch``: distinct (weight, output index) pairs that appear
  in an otofx group (at the weight's output dim); ``share`` = ``otofx ch`` / ``out ch``.
* ``exact``: a random half (floor) of every group's rows zeroed (``_common.zero_half_rows``),
  ``oto.compress(verify=False)``, then max|diff| <= 1e-4 * max(1, max|y|) against the zeroed full
  model on the example input and on a fresh one of the same shape, and strictly fewer parameters.
  ``rel err``: the worse of the two; ``max|y|``: the reference output's scale (the check is not
  vacuous); ``params``: compressed / full; ``otofx s``: ``otofx.OTO(model, x)``. ``form``: what
  ``compress()`` returned: ``module`` (the model's own class, which runs at any size the model does) or
  ``graph`` (the GraphModule, when the own class could not be re-sized; the reason is logged).
* ``OTO``: only-train-once 3.0.1 through ``_peers.oto_coverage`` (its own ``random_set_zero_groups``
  and ``construct_subnet``), first called as on a CNN (``OTO call`` ``default``); when that raises,
  once more (``retry``) with what its ONNX-based tracer can follow: Hugging Face models with eager
  attention, ``use_cache=False`` and only ``last_hidden_state`` returned (``return_dict`` outputs
  are not traceable), ``nn.MultiheadAttention``'s fused fast path off (see :func:`oto_peer`); the
  notes keep both failures. ``OTO grp``/``OTO rows`` its prunable non-auxiliary groups (the torchvision
  classifier left out), ``OTO ch`` the output channels of the conv/linear weights they hold (whole
  output dim, as in bench/coverage.py), ``vs OTO`` = ``otofx ch`` - ``OTO ch`` (``FEWER`` when
  negative), then whether its compressed model runs and is exact. ``fail`` = OTO(model, x) raised.
* ``TP``: torch-pruning 1.6.1 with its default call, no per-model configuration:
  ``_peers.tp_groups`` (``get_all_groups``, classifier ignored) gives ``TP grp``/``TP ch``; ``TP 50%
  runs``: ``MagnitudePruner(pruning_ratio=0.5)`` then ``step()`` (``_peers.tp_prune``) and a forward
  call that returns the dense output's shapes. Head-aware pruning in torch-pruning needs a
  ``num_heads={module: heads}`` dict per model, which this default call does not give. torch-pruning
  prunes by magnitude (its output changes by design), so it has no exactness column.
* Each peer runs per model in a forked child (:func:`isolated`) stopped after ``--peer-timeout``
  seconds or ``--peer-mem`` GiB: torch-pruning on Swin grew past 19 GiB in one try.

Latency (``--latency``, on by default): torchvision ``vit_b_16`` at 1x3x224x224 and a 6-layer HF
``BertModel`` (hidden 768, 12 heads, intermediate 3072) on ``input_ids`` 1x128;
``torch.set_num_threads(1)``, ``torch.inference_mode()``. A random half of every group's rows is
zeroed; ``dense`` is that model, ``compressed`` is ``oto.compress()`` (verified on the example
input). Median ms of ``--runs`` calls of each after ``--warmup``, dense and compressed calls
alternating (so load from other processes falls on both); ``analysis s`` times ``otofx.OTO(model,
x)``, ``compress s`` times ``compress()`` with its verification (two forward calls). FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` with two fixes for CPU: it has no formula for
``aten._scaled_dot_product_flash_attention_for_cpu`` (registered here with torch's own SDPA
formula), and ``nn.MultiheadAttention``'s fused inference path (``aten._native_multi_head_attention``)
is invisible to it, so that path is off while counting (timing keeps it).

Run::

    /work/venv/bin/python bench/transformers.py                  # both tables (~28 min on 2 busy cores,
                                                                 # mostly the peers on Swin/MaxViT)
    /work/venv/bin/python bench/transformers.py --no-latency     # coverage only (--no-peers: ~1.5 min)
    /work/venv/bin/python bench/transformers.py --no-coverage    # latency only (~1-2 min)
    /work/venv/bin/python bench/transformers.py --models tv:swin_t hf:bert --no-peers --no-latency
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

# This file is bench/transformers.py and bench/ is sys.path[0] when it runs as a script, so a bare
# ``import transformers`` would import this file. Import Hugging Face's package with bench/ hidden.
_BENCH = Path(__file__).resolve().parent
_saved_path = sys.path[:]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.modules.pop("transformers", None)
import transformers as hf  # noqa: E402

sys.path[:] = _saved_path

import torch  # noqa: E402
import torchvision  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import nn  # noqa: E402

import otofx  # noqa: E402
from _common import error_line, flops, machine, nparams, zero_half_rows  # noqa: E402
from _peers import OtoCoverage, find_classifier, oto_coverage, tp_groups, tp_prune  # noqa: E402

TOL = 1e-4
L = 16  # sequence length of the coverage inputs

# name -> (input shape, builder kwargs, head_dim)
TV = {
    "vit_b_16": ((1, 3, 32, 32), {"image_size": 32}, 64),
    "vit_b_32": ((1, 3, 64, 64), {"image_size": 64}, 64),
    "swin_t": ((1, 3, 64, 64), {}, 32),
    "swin_v2_t": ((1, 3, 64, 64), {}, 32),
    "maxvit_t": ((1, 3, 224, 224), {}, 32),
}
HF = ["bert", "gpt2", "vit", "llama", "t5", "distilbert"]
ATTN_NAME = re.compile(r"(attn|attention|query|q_proj|qkv|in_proj|\.q\.)")
MLP_NAME = re.compile(r"(mlp|intermediate|c_fc|\.wi\.|gate_proj|up_proj|lin1)")


# ---------------------------------------------------------------------------------------- models
def hf_model(name: str) -> tuple[nn.Module, torch.Tensor, int]:
    """(model, example input, head_dim): the small configs of tests/test_transformers.py::_hf."""
    ids = torch.randint(0, 100, (2, L), generator=torch.Generator().manual_seed(0))
    if name == "bert":
        c = hf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64)
        return hf.BertModel(c), ids, 8
    if name == "gpt2":
        c = hf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                          eos_token_id=0)
        return hf.GPT2Model(c), ids, 8
    if name == "vit":
        c = hf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)
        return hf.ViTModel(c), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 8
    if name == "llama":
        c = hf.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        return hf.LlamaModel(c), ids, 8
    if name == "t5":
        c = hf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return hf.T5EncoderModel(c), ids, 8
    if name == "distilbert":
        c = hf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                max_position_embeddings=64)
        return hf.DistilBertModel(c), ids, 8
    raise KeyError(name)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics, every bias and every constant-initialised parameter drawn at random, in place."""
    g = torch.Generator().manual_seed(seed)

    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_((torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(t.dtype))

    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and rm.is_floating_point():
                u(rm, -0.5, 0.5)
            if isinstance(rv, torch.Tensor) and rv.is_floating_point():
                u(rv, 0.5, 1.5)
            for name, p in m.named_parameters(recurse=False):
                if not p.is_floating_point() or p.numel() == 0:
                    continue
                if "bias" in name and "relative_position" not in name:
                    u(p, -0.2, 0.2)
                elif p.numel() == 1 or bool((p == p.reshape(-1)[0]).all()):
                    u(p, 0.5, 1.5)
    return model


def fresh(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Another input of the same shape: new floats, or new token ids below the largest one seen."""
    g = torch.Generator().manual_seed(seed)
    if x.is_floating_point():
        return torch.randn(x.shape, generator=g, dtype=x.dtype)
    return torch.randint(0, int(x.max()) + 1, x.shape, generator=g, dtype=x.dtype)


def ref_kwargs(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return {"use_cache": False} if getattr(cfg, "use_cache", None) is not None else {}


def outputs(model: nn.Module, x: torch.Tensor, **kw):
    with torch.no_grad():
        y = model(x, **kw)
    return y.to_tuple() if isinstance(y, hf.utils.ModelOutput) else y


# ---------------------------------------------------------------------------------------- counting
def out_channels(model: nn.Module, classifier: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Output-channel weights of every conv/linear layer but the classifier: name -> (output dim, size).

    Static, not by forward hooks: torchvision's Swin calls ``F.linear`` on its ``qkv``/``proj``
    weights and ``nn.MultiheadAttention`` on its ``out_proj`` weight without calling those modules.
    Every such layer of the models here runs.
    """
    found: dict[str, tuple[int, int]] = {}
    conv1d = hf.pytorch_utils.Conv1D
    for name, m in model.named_modules():
        if name in classifier:
            continue
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            found[f"{name}.in_proj_weight"] = (0, m.in_proj_weight.shape[0])
        elif isinstance(m, conv1d):
            found[f"{name}.weight"] = (1, m.weight.shape[1])
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            found[f"{name}.weight"] = (0, m.weight.shape[0])
    return found


def classify(groups, head_dim: int, outs: dict[str, tuple[int, int]]) -> dict:
    heads = mlp = 0
    head_rows = mlp_rows = 0
    for z in groups:
        if any(ATTN_NAME.search(n) and idx.shape[1] % head_dim == 0 for n, _, idx in z.params):
            heads, head_rows = heads + 1, head_rows + z.rows
        elif any(n in outs and d == outs[n][0] and MLP_NAME.search(n) for n, d, _ in z.params):
            mlp, mlp_rows = mlp + 1, mlp_rows + z.rows
    return {"groups": len(groups), "head grp": heads, "head rows": head_rows, "MLP grp": mlp, "MLP rows": mlp_rows,
            "rows": sum(z.rows for z in groups)}


def otofx_channels(groups, outs: dict[str, tuple[int, int]]) -> int:
    return len({(n, int(i)) for z in groups for n, d, idx in z.params
                if n in outs and d == outs[n][0] for i in idx.unique()})


class FirstOutput(nn.Module):
    """``model(x)[0]`` as a plain tensor (only-train-once traces with ``torch.jit``: no dict outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def oto_peer(model: nn.Module, x: torch.Tensor, classifier: tuple[str, ...]) -> tuple[OtoCoverage, str]:
    """only-train-once as called on a CNN; when that fails, once more with the settings its ONNX tracer
    can follow: HF models eager attention, ``use_cache=False`` and only ``last_hidden_state`` returned
    (:class:`FirstOutput`), ``nn.MultiheadAttention``'s fused fast path off. Returns (result, setting)."""
    oc = oto_coverage(model, x, classifier)
    if oc.ok:
        return oc, "default"
    retry = copy.deepcopy(model)
    if isinstance(retry, hf.PreTrainedModel):
        retry.set_attn_implementation("eager")
        retry.config.use_cache = False
        retry = FirstOutput(retry)
        classifier = ()
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        oc2 = oto_coverage(retry, x, tuple(f"model.{c}" if isinstance(retry, FirstOutput) else c for c in classifier))
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    oc2.error = f"default: {oc.error[:70]}" + (f" | retry: {oc2.error[:90]}" if oc2.error else "")
    if isinstance(retry, FirstOutput):
        oc2.prunable_params = tuple(n.removeprefix("model.") for n in oc2.prunable_params)
    return oc2, "retry"


def versus(ours: int, theirs: int) -> str:
    d = ours - theirs
    return "=" if d == 0 else (f"FEWER ({d})" if d < 0 else f"+{d}")


def yn(b: bool) -> str:
    return "yes" if b else "no"


def same_shapes(a, b) -> bool:
    fa, fb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(fa) == len(fb) and all(getattr(p, "shape", None) == getattr(q, "shape", None) for p, q in zip(fa, fb))


# ---------------------------------------------------------------------------------------- coverage
def isolated(fn, *args, timeout: float, mem_gib: float):
    """``fn(*args)`` in a forked child with a time limit and ``mem_gib`` GiB of address space beyond
    what the child starts with (torch-pruning on Swin ran past 19 GiB and was still going). Returns
    ``fn``'s result, or a string that says why there is none."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
        limit = vm * 1024 + int(mem_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            send.send(fn(*args))
        except BaseException as e:  # noqa: BLE001 -- MemoryError included
            send.send(error_line(e, 90))

    proc = ctx.Process(target=child, daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            return recv.recv()
        return f"stopped after {time.perf_counter() - t0:.0f} s (--peer-timeout)"
    except EOFError:
        proc.join(5)
        return f"died (exit code {proc.exitcode}; over {mem_gib:g} GiB?)"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()


def oto_columns(model: nn.Module, x: torch.Tensor, classifier: tuple[str, ...],
                outs: dict[str, tuple[int, int]]) -> tuple[dict, int | None, list[str]]:
    """(columns, OTO ch or None, notes) for only-train-once."""
    oc, setting = oto_peer(model, x, classifier)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    ch = sum(shapes[n][outs[n][0]] for n in oc.prunable_params if n in outs) if oc.ok else None
    cols = {"OTO call": setting, "OTO grp": oc.groups if oc.ok else "fail",
            "OTO rows": oc.prunable_rows if oc.ok else "fail", "OTO ch": "fail" if ch is None else ch,
            "OTO runs": yn(oc.runs), "OTO exact": yn(oc.exact)}
    return cols, ch, [f"OTO {oc.error}"] if oc.error else []


def tp_columns(model: nn.Module, x: torch.Tensor, classifier: tuple[str, ...]) -> tuple[dict, list[str]]:
    """(columns, notes) for torch-pruning's default call."""
    tg = tp_groups(model, x, classifier)
    cols = {"TP grp": tg.groups if tg.ok else "fail", "TP ch": tg.channels if tg.ok else "fail", "TP 50% runs": "no"}
    notes = [f"TP {tg.error}"] if tg.error else []
    if not tg.ok:
        return cols, notes
    tpp = tp_prune(model, x, 0.5, classifier)
    if not tpp.ok:
        return cols, notes + [f"TP prune: {tpp.error}"]
    try:
        kw = ref_kwargs(model)
        same = same_shapes(outputs(model, x, **kw), outputs(tpp.obj.eval(), x, **kw))
        cols["TP 50% runs"] = yn(same)
        if not same:
            notes.append("TP pruned model: output shapes differ from the dense model's")
    except Exception as e:  # noqa: BLE001
        notes.append(f"TP pruned model: {error_line(e, 80)}")
    return cols, notes


def coverage_row(label: str, model: nn.Module, x: torch.Tensor, head_dim: int, classifier: tuple[str, ...],
                 peers: bool, timeout: float, mem_gib: float) -> dict:
    randomise(model.eval())
    outs = out_channels(model, classifier)
    total = sum(n for _, n in outs.values())
    row: dict = {"model": label, "input": "x".join(map(str, x.shape))}
    notes = []
    t0 = time.perf_counter()
    try:
        oto = otofx.OTO(model, x)
        seconds = time.perf_counter() - t0
        row.update(classify(oto.groups, head_dim, outs))
        ch = otofx_channels(oto.groups, outs)
        row.update({"out ch": total, "otofx ch": ch, "share": f"{ch / total:.0%}"})
    except Exception as e:  # noqa: BLE001 -- failures are data here
        oto = None
        row["exact"] = "fail"
        notes.append(f"otofx {error_line(e, 80)}")
    # the peers deep-copy the model, which must not be zeroed yet
    if peers:
        got = isolated(oto_columns, model, x, classifier, outs, timeout=timeout, mem_gib=mem_gib)
        if isinstance(got, str):
            row.update({"OTO grp": "fail"})
            notes.append(f"OTO {got}")
        else:
            cols, oto_ch, more = got
            row.update(cols)
            row["vs OTO"] = versus(row["otofx ch"], oto_ch) if oto_ch is not None and "otofx ch" in row else "n/a"
            notes += more
        got = isolated(tp_columns, model, x, classifier, timeout=timeout, mem_gib=mem_gib)
        if isinstance(got, str):
            row.update({"TP grp": "fail"})
            notes.append(f"TP {got}")
        else:
            row.update(got[0])
            notes += got[1]
    if oto is not None:
        try:
            zero_half_rows(model, oto.groups)
            small = oto.compress(verify=False).eval()
            ok, err, ymax = True, 0.0, 0.0
            for inp in (x, fresh(x)):
                y = outputs(model, inp, **ref_kwargs(model))
                # NB: the module form is the model's class: it is called as the model is (no KV cache)
                own = {} if isinstance(small, torch.fx.GraphModule) else ref_kwargs(small)
                good, e = otofx.outputs_close(y, outputs(small, inp, **own), TOL)
                ok, err = ok and good, max(err, e)
                ymax = max([ymax] + [float(t.abs().max()) for t in torch.utils._pytree.tree_leaves(y)
                                     if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()])
            fewer = nparams(small) < nparams(model)
            row.update({"form": "graph" if isinstance(small, torch.fx.GraphModule) else "module",
                        "exact": "yes" if ok and fewer else ("no" if not ok else "no (params)"),
                        "rel err": f"{err:.1e}", "max|y|": f"{ymax:.2f}",
                        "params": f"{nparams(small) / nparams(model):.2f}", "otofx s": f"{seconds:.1f}"})
        except Exception as e:  # noqa: BLE001
            row["exact"] = "fail"
            notes.append(f"otofx compress {error_line(e, 80)}")
    row["notes"] = "; ".join(n if n.startswith("OTO") else n[:110] for n in notes)
    return row


# ---------------------------------------------------------------------------------------- latency
def interleaved_ms(a: nn.Module, b: nn.Module, x: torch.Tensor, runs: int, warmup: int) -> tuple[float, float]:
    """Median ms of ``runs`` calls of ``a`` and of ``b``, alternating (a, b, a, b, ...) so that a change
    in the machine's load falls on both, after ``warmup`` calls of each."""
    ta, tb = [], []
    with torch.inference_mode():
        for i in range(warmup + runs):
            for model, out in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ta), statistics.median(tb)


def latency_row(label: str, dense: nn.Module, x: torch.Tensor, runs: int, warmup: int) -> dict:
    randomise(dense.eval())
    t0 = time.perf_counter()
    oto = otofx.OTO(dense, x)
    analysis = time.perf_counter() - t0
    zero_half_rows(dense, oto.groups)
    t0 = time.perf_counter()
    small = oto.compress().eval()  # verified against the zeroed model on x
    compress = time.perf_counter() - t0
    if hasattr(dense, "config"):
        dense.config.use_cache = False  # the compressed HF model has no cache either
    d_ms, s_ms = interleaved_ms(dense, small, x, runs, warmup)
    d_fl, s_fl = flops(dense, x), flops(small, x)
    return {"model": label, "input": "x".join(map(str, x.shape)), "dense ms": f"{d_ms:.1f}",
            "compressed ms": f"{s_ms:.1f}", "speedup": f"{d_ms / s_ms:.2f}", "FLOPs ratio": f"{s_fl / d_fl:.3f}",
            "params ratio": f"{nparams(small) / nparams(dense):.3f}", "dense GFLOPs": f"{d_fl / 1e9:.2f}",
            "analysis s": f"{analysis:.1f}", "compress s": f"{compress:.1f}", "runs": f"{runs} (+{warmup})"}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coverage", action=argparse.BooleanOptionalAction, default=True, help="coverage table")
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True, help="latency table")
    ap.add_argument("--models", nargs="+", metavar="tv:NAME|hf:NAME",
                    help="coverage models (default: every tv: and hf: model)")
    ap.add_argument("--no-peers", action="store_true", help="skip only-train-once and torch-pruning")
    ap.add_argument("--peer-timeout", type=float, default=420, help="seconds per peer and model (default 420)")
    ap.add_argument("--peer-mem", type=float, default=6, help="GiB a peer may add per model (default 6)")
    ap.add_argument("--runs", type=int, default=10, help="timed forward calls, median (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forward calls first (default 2)")
    ap.add_argument("--format", default="github", help="tabulate table format")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    if args.coverage:
        names = args.models or [f"tv:{n}" for n in TV] + [f"hf:{n}" for n in HF]
        rows = []
        for i, full in enumerate(names, 1):
            kind, name = full.split(":")
            torch.manual_seed(0)
            t0 = time.perf_counter()
            if kind == "tv":
                shape, kw, head_dim = TV[name]
                model = torchvision.models.get_model(name, weights=None, **kw)
                x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
                classifier = find_classifier(model)
            else:
                model, x, head_dim = hf_model(name)
                classifier = ()
            rows.append(coverage_row(full, model, x, head_dim, classifier, not args.no_peers, args.peer_timeout,
                                     args.peer_mem))
            print(f"[{i}/{len(names)}] {full} {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"\n{machine()}; coverage, 1 torch thread; {load()}\n")
        notes = [(r["model"], r.pop("notes")) for r in rows]
        print(tabulate(rows, headers="keys", tablefmt=args.format))
        if any(n for _, n in notes):
            print("\nNotes (first line of each failure):\n")
            print("\n".join(f"* {m}: {n}" for m, n in notes if n))
        n = len(rows)
        count = lambda key, val: sum(r.get(key) == val for r in rows)  # noqa: E731
        print(f"\n* otofx exact on {count('exact', 'yes')}/{n}")
        if not args.no_peers:
            print(f"* only-train-once builds on {n - count('OTO grp', 'fail')}/{n}, its compressed model runs on "
                  f"{count('OTO runs', 'yes')}/{n} and is exact on {count('OTO exact', 'yes')}/{n}")
            print(f"* torch-pruning (default call) finds groups on {n - count('TP grp', 'fail')}/{n}; its 50% "
                  f"pruned model runs on {count('TP 50% runs', 'yes')}/{n}")

    if args.latency:
        print(f"\nbefore latency: {load()}", flush=True)
        lat = []
        torch.manual_seed(0)
        lat.append(latency_row("tv vit_b_16", torchvision.models.vit_b_16(weights=None),
                               torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
                               args.runs, args.warmup))
        print("[latency] tv vit_b_16", flush=True)
        torch.manual_seed(0)
        bert = hf.BertModel(hf.BertConfig(hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                                          intermediate_size=3072))
        ids = torch.randint(0, bert.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        lat.append(latency_row("hf bert 6x768", bert, ids, args.runs, args.warmup))
        print(f"\n{machine()}; latency: batch 1, inference_mode, median; after: {load()}\n")
        print(tabulate(lat, headers="keys", tablefmt=args.format))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
