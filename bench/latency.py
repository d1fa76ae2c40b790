"""Latency of dense vs otofx-compressed models, on the CPU (torch-pruning as the peer) or on one GPU.

For each model (random weights with non-trivial norm statistics and biases, eval mode):

* ``dense``: the model after a random half (floor) of every otofx group's rows is zeroed, but for
  the widths a LayerNorm normalises (BERT's and ViT's residual stream) unless ``--stream``;
* ``otofx``: ``oto.compress()`` of that model (the zero rows removed);
* ``torch-pruning`` (CPU, float32, ``--peers``): ``MagnitudePruner(pruning_ratio=0.5, importance=L2,
  classifier ignored)`` then ``step()`` on a copy of the dense model (not zero-invariant: outputs
  change).

Models: torchvision names (input ``batch x 3x224x224``) and ``bert_base``, a Hugging Face
``BertModel`` of BERT-base size from ``BertConfig()`` (12 layers, hidden 768, 12 heads, MLP 3072;
random weights, nothing downloaded; input ``input_ids`` ``batch x 128``). The analysis runs on the
CPU in float32 on a batch of one; the dense and compressed models are then moved to ``--device``
and ``--dtype`` (``fp32`` or ``bf16``) and timed there on ``--batch``. ``vit_b_16``'s dense model
keeps ``nn.MultiheadAttention``'s fused inference path (eval and ``inference_mode``), the
baseline the compressed model's ``PrunedMultiheadAttention`` has to beat.

Columns: ``dense ms``/``pruned ms``: median of ``--runs`` calls after ``--warmup`` calls of each,
dense and pruned calls alternating (a change in machine load falls on both), under
``torch.inference_mode``; wall clock on the CPU, CUDA events around each call on a GPU.
``speedup`` = dense / pruned. ``FLOPs ratio``: ``torch.utils.flop_counter.FlopCounterMode`` (one
multiply-add = 2 FLOPs) with the MHA fused path off while counting (it is invisible to the counter)
and the CPU flash-attention kernel given torch's SDPA formula. ``rel err``: max|dense - pruned| /
max(1, max|dense|) on the timed input, on the device, in the dtype; ``tol``: the pipeline's
dtype-fitting bound (``otofx.pipeline.fitted_rtol``, 1e-4 in float32); ``exact``: rel err <= tol.
On CUDA, float32 means float32: TF32 is off for matmuls and cuDNN convolutions while measuring.

Run::

    /work/venv/bin/python bench/latency.py                                   # CPU, 1 thread, batch 1 (~4 min)
    /work/venv/bin/python bench/latency.py --quick --models vit_b_16 --no-peers
    /work/venv/bin/python bench/latency.py --device cuda                     # the GPU table (~1.5 min)
    /work/venv/bin/python bench/latency.py --device cuda --dtype bf16 --models vit_b_16

``--device cuda`` defaults to ``--models resnet50 vit_b_16 bert_base --batch 64 --dtype fp32 bf16``,
i.e. :func:`gpu_rows`, which other scripts (a GPU bench) call directly.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn

import otofx
from _common import build, error_line, flops, machine, nparams, randomise_norms, timing_args, zero_half_rows
from _peers import tp_prune
from otofx.pipeline import contraction_depth, fitted_rtol, outputs_close

MODELS = ["resnet50", "mobilenet_v2", "vit_b_16"]
GPU_MODELS = ["resnet50", "vit_b_16", "bert_base"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BERT_SEQ = 128


def build_model(name: str, seed: int = 0) -> tuple[nn.Module, callable]:
    """(dense model in float32 on the CPU, eval, with randomised norms, biases and all-zero weights;
    its input maker ``(batch) -> x``)."""
    if name == "bert_base":
        import transformers

        torch.manual_seed(seed)
        config = transformers.BertConfig()
        model = transformers.BertModel(config).eval()
        vocab = config.vocab_size

        def make(batch: int) -> torch.Tensor:
            return torch.randint(0, vocab, (batch, BERT_SEQ), generator=torch.Generator().manual_seed(seed))
    else:
        model = build(name, seed)

        def make(batch: int) -> torch.Tensor:
            return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # NB: vit's classifier starts at zero: its output would be the bias alone
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    randomise_norms(model, gen)
    return model, make


def interleaved_ms(a: nn.Module, b: nn.Module, x: torch.Tensor, runs: int, warmup: int) -> tuple[float, float]:
    """Median ms of ``runs`` calls of ``a`` and of ``b``, alternating, after ``warmup`` calls of each.

    On CUDA each call is timed by a pair of events (one synchronisation at the end); on the CPU by
    the wall clock.
    """
    cuda = x.device.type == "cuda"
    times: tuple[list, list] = ([], [])
    with torch.inference_mode(), (torch.cuda.device(x.device) if cuda else contextlib.nullcontext()):
        for _ in range(warmup):
            a(x)
            b(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        for _ in range(runs):
            for model, out in ((a, times[0]), (b, times[1])):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(x)
                    end.record()
                    out.append((start, end))
                else:
                    t0 = time.perf_counter()
                    model(x)
                    out.append(1e3 * (time.perf_counter() - t0))
        if cuda:
            torch.cuda.synchronize(x.device)
            times = tuple([s.elapsed_time(e) for s, e in t] for t in times)
    return statistics.median(times[0]), statistics.median(times[1])


class _fp32_is_fp32:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (restored after)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


def _outputs(model: nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        return model(x)


def rows_for(name: str, *, device: str = "cpu", dtypes=("fp32",), batch: int = 1, runs: int = 20, warmup: int = 3,
             peers: bool = True, stream: bool = False) -> list[dict]:
    """One row per dtype (and per peer on the CPU in float32) for model ``name``; see the module
    docstring. ``stream``: the widths a LayerNorm normalises lose half their rows too."""
    dense, make = build_model(name)
    example = make(1)
    oto = otofx.OTO(dense, example)
    zero_half_rows(dense, oto.groups, layer_norm_widths=stream)
    small = oto.compress(verify=False).eval()  # checked below, on the device and in the dtype timed
    pruned = {"otofx": small}
    if peers and device == "cpu" and list(dtypes) == ["fp32"]:
        tp = tp_prune(dense, example, 0.5)
        pruned["torch-pruning"] = tp.obj.eval() if tp.ok else tp.error
    depth = contraction_depth(dense)
    out = []
    for dt in dtypes:
        dtype = DTYPES[dt]
        on_cpu_fp32 = device == "cpu" and dtype == torch.float32
        move = (lambda m: m) if on_cpu_fp32 else (lambda m: copy.deepcopy(m).to(device=device, dtype=dtype))
        x = make(batch).to(device)
        if x.is_floating_point():
            x = x.to(dtype)
        d = move(dense)
        with _fp32_is_fp32():
            ref = _outputs(d, x)
            base_flops, base_params = flops(d, x), nparams(d)
            for tool, p in pruned.items():
                row = {"model": name, "device": device, "dtype": dt, "batch": batch, "pruned by": tool}
                if isinstance(p, str):
                    out.append({**row, "notes": p[:80]})
                    continue
                p = move(p)
                try:
                    got = _outputs(p, x)
                except Exception as e:  # noqa: BLE001  (torch-pruning's model of a ViT does not run)
                    out.append({**row, "notes": error_line(e, 80)})
                    continue
                ok, err = outputs_close(ref, got, 1e-4, dtype=dtype, depth=depth)
                del got
                d_ms, p_ms = interleaved_ms(d, p, x, runs, warmup)
                row.update({"dense ms": d_ms, "pruned ms": p_ms, "speedup": d_ms / p_ms,
                            "FLOPs ratio": flops(p, x) / base_flops, "params ratio": nparams(p) / base_params,
                            "dense GFLOPs": base_flops / 1e9})
                if tool == "otofx":
                    row.update({"rel err": f"{err:.1e}", "tol": f"{fitted_rtol(1e-4, dtype, depth):.0e}",
                                "exact": "yes" if ok else "NO"})
                out.append(row)
                del p
        del d, ref
        if device != "cpu":
            torch.cuda.empty_cache()
    return out


def gpu_rows(device: str = "cuda", batch: int = 64, *, models=GPU_MODELS, runs: int = 30,
             warmup: int = 5) -> list[dict]:
    """Dense vs compressed latency on one device in float32 and bfloat16, as a list of table rows.

    For resnet50, vit_b_16 (3x224x224) and a BERT-base-sized ``BertModel`` (``input_ids`` of length
    128), random weights: a random half of every otofx group's rows is zeroed, but for the widths
    LayerNorms normalise (analysis on the CPU on a batch of one), ``oto.compress()``, then both models are moved to ``device`` and timed on
    ``batch`` with CUDA events (the wall clock on the CPU), ``runs`` calls each after ``warmup``,
    alternating. Each row (one per model and dtype): model, device, dtype, batch, dense ms, pruned
    ms, speedup (dense / pruned), FLOPs ratio, params ratio, dense GFLOPs, rel err (dense vs
    compressed on the timed input), tol (the dtype-fitting bound) and exact. No peers. About 90 s
    on one GPU; ``device="cpu"`` with a small ``batch`` and few ``runs`` checks it without one.
    """
    return [r for name in models
            for r in rows_for(name, device=device, dtypes=("fp32", "bf16"), batch=batch, runs=runs, warmup=warmup,
                              peers=False)]


def table(rows: list[dict], fmt: str = "github") -> str:
    """The rows as a tabulate table, floats with 2 decimals (FLOPs and params ratios with 3)."""
    def cell(key, v):
        return f"{v:.3f}" if isinstance(v, float) and "ratio" in key else f"{v:.2f}" if isinstance(v, float) else v
    return tabulate([{k: cell(k, v) for k, v in r.items()} for r in rows], headers="keys", tablefmt=fmt,
                    disable_numparse=True)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, metavar="NAME",
                    help=f"torchvision names or bert_base (default: {' '.join(MODELS)}; "
                         f"on a GPU {' '.join(GPU_MODELS)})")
    timing_args(ap)
    ap.add_argument("--quick", action="store_true", help="5 runs after 1 warm-up")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                    help="fp32 and/or bf16 (default: fp32 on the CPU, both on a GPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on the CPU, 64 on a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 on the CPU, torch's default with a GPU)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="torch-pruning beside otofx (CPU, float32 only)")
    ap.add_argument("--stream", action="store_true",
                    help="zero half of the widths a LayerNorm normalises too (the residual stream of BERT and "
                         "ViT); by default heads and MLP widths only, as the issue-15 targets are stated")
    args = ap.parse_args()
    gpu = args.device != "cpu"
    models = args.models or (GPU_MODELS if gpu else MODELS)
    dtypes = args.dtype or (["fp32", "bf16"] if gpu else ["fp32"])
    batch = args.batch or (64 if gpu else 1)
    if args.quick:
        args.runs, args.warmup = 5, 1
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    device = machine()
    if gpu:
        device += f"; {torch.cuda.get_device_name(torch.device(args.device))}"

    print(f"before: {load()}", flush=True)
    t0 = time.perf_counter()
    rows = [r for name in models for r in rows_for(name, device=args.device, dtypes=dtypes, batch=batch,
                                                    runs=args.runs, warmup=args.warmup, peers=args.peers,
                                                    stream=args.stream)]
    print(f"{device}; batch {batch}, median of {args.runs} after {args.warmup} warm-up; "
          f"{time.perf_counter() - t0:.0f} s; after: {load()}\n")
    print(table(rows, args.format))


if __name__ == "__main__":
    main()
