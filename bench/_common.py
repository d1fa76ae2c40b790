"""Helpers shared by the bench/ scripts: model list, randomised norms, zeroing rows, timing.

The scripts run as ``python bench/<name>.py``, so ``bench/`` is on ``sys.path`` and they import
this module (and ``_peers``) by their bare names. Nothing here prints but :func:`apart_args`'s child row
and :func:`report_apart`'s table.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from _peers import randomise_norms  # noqa: F401  (re-exported: one definition for every script)

EXCLUDED_FAMILIES = ("vit_", "swin_", "maxvit")           # transformers: not CNNs
LARGE = ("regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf")  # skipped unless --include-large
MODEL_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
MIN_SIDE = {"inception_v3": 96}  # smallest input side the model accepts (75 for inception_v3)


def cnn_names(include_large: bool = False) -> list[str]:
    """Every torchvision classification CNN (transformers removed), in torchvision's order."""
    names = torchvision.models.list_models(module=torchvision.models)
    names = [n for n in names if not n.startswith(EXCLUDED_FAMILIES)]
    return names if include_large else [n for n in names if n not in LARGE]


def build(name: str, seed: int = 0) -> nn.Module:
    """A torchvision model with random (seeded) weights, in eval mode."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, **MODEL_KWARGS.get(name, {})).eval()


def example_input(name: str, side: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    side = max(side, MIN_SIDE.get(name, 0))
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def zero_half_rows(model: nn.Module, groups, seed: int = 0, layer_norm_widths: bool = True) -> int:
    """Zero a random half (floor) of the rows of every group in ``model``; returns rows zeroed.

    ``layer_norm_widths=False`` leaves the groups a LayerNorm normalises alone (the residual stream
    of BERT and ViT, pinned before otofx kept a layer norm's divisor): heads and MLP widths only,
    as the earlier tables measured."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    normed = set() if layer_norm_widths else {
        f"{n}.{a}" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) for a in ("weight", "bias")}
    total = 0
    with torch.no_grad():
        for z in groups:
            rows = torch.randperm(z.rows, generator=gen)[: z.rows // 2]
            if any(name in normed for name, _, _ in z.params):
                continue
            total += len(rows)
            for name, dim, idx in z.params:
                params[name].data.movedim(dim, 0)[idx[rows].reshape(-1)] = 0
    return total


def nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # torch's formula for the CUDA kernels


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """Conv/matmul/attention FLOPs of one ``model(x)`` under ``inference_mode`` (multiply-add = 2).

    # NB: nn.MultiheadAttention's fused fast path is switched off while counting (FlopCounterMode does
    # not see inside it), and the CPU flash-attention kernel is counted with torch's SDPA formula
    """
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    return counter.get_total_flops()


def wall(fn: Callable[[], object]) -> Callable[[], float]:
    """A sampler for :func:`median_of`: the wall time of one ``fn()`` call."""
    def sample() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return sample


def median_of(sample: Callable[[], float], repeats: int, warmup: int = 1) -> float:
    """Median of ``repeats`` calls of ``sample`` (which returns seconds) after ``warmup`` discarded calls."""
    for _ in range(warmup):
        sample()
    return statistics.median(sample() for _ in range(repeats))


def error_line(e: BaseException, limit: int = 90) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:limit] if msg else ''}".rstrip(": ")


def otofx_revision() -> str:
    """The commit of the otofx checkout, ``+dirty`` when its library sources have local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "otofx", "passes", "kernels")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, Python {platform.python_version()}, otofx {otofx_revision()}")


def model_arg(parser: argparse.ArgumentParser, default: list[str]) -> None:
    parser.add_argument("--models", nargs="+", default=default, metavar="NAME",
                        help=f"torchvision model names (default: {' '.join(default) or 'all CNNs'})")


def timing_args(parser: argparse.ArgumentParser, runs: int = 20, warmup: int = 3) -> None:
    """``--runs`` (timed forward calls, median), ``--warmup`` and ``--format``, shared by the latency benches."""
    parser.add_argument("--runs", type=int, default=runs, help=f"timed forward calls, median (default {runs})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed forward calls first (default {warmup})")
    parser.add_argument("--format", default="github", help="tabulate table format")


def rows_apart(script: str, names: list, timeout: float, key: str = "model", failed: str = "front-end"):
    """Each name's row, from ``python script --one name`` run in its own process (it prints ``ROW <json>``),
    as it comes; a process that prints no row gets ``{key: name, failed: "FAIL <its last stderr line>"}``,
    one past ``timeout`` seconds ``{key: name, failed: "timeout (N s)"}``."""
    for name in names:
        try:
            p = subprocess.run([sys.executable, script, "--one", name], capture_output=True, text=True,
                               timeout=timeout)
            got = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            yield json.loads(got[-1]) if got else {key: name, failed: "FAIL " + (p.stderr.strip().splitlines()
                                                                                  or ["?"])[-1][:160]}
        except subprocess.TimeoutExpired:
            yield {key: name, failed: f"timeout ({timeout:.0f} s)"}


def otofx_messages() -> list:
    """A list that gets every message otofx logs from now on (its warnings say where rows are kept)."""
    said: list = []
    handler = logging.Handler()
    handler.emit = lambda r: said.append(r.getMessage())
    logging.getLogger("otofx").addHandler(handler)
    return said


def apart_args(ap: argparse.ArgumentParser, one: Callable[[str], dict], timeout: float = 900):
    """``ap``'s arguments with ``--timeout`` (per process of :func:`rows_apart`) and the hidden ``--one NAME``
    it runs the children with; None in such a child, which has printed ``one(NAME)``'s row."""
    ap.add_argument("--timeout", type=float, default=timeout)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(one(a.one)), flush=True)  # NB: the child's one output line
        return None
    return a


def report_apart(script: str, names: list, timeout: float, keys: list, versions: str) -> list:
    """Run each name apart (:func:`rows_apart`), print ``versions`` and the load average, each row as JSON
    as it comes, then the table of ``keys`` and the load average at the end; returns the rows."""
    from tabulate import tabulate

    print(f"{versions}; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for row in rows_apart(script, names, timeout):
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = [k for k in keys if k == keys[0] or any(r.get(k) not in (None, "") for r in rows)]  # NB: no empty columns
    print(tabulate([[r.get(k, "") for k in keys] for r in rows], headers=keys, tablefmt="github"))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return rows


# the columns of a library sweep (:func:`library_sweep`)
LIBRARY_KEYS = ["model", "class", "front-end", "groups", "auto", "module", "kept", "graph kept", "other input",
                "kept rows at", "analysis s", "compress s"]


def compressed_row(name: str, build: Callable[[], nn.Module], inputs: Callable[[int, int], dict], side: int,
                   other_side: int, more: Callable[[nn.Module, nn.Module], dict] | None = None) -> dict:
    """One row of a library sweep: ``build()`` (random weights, eval mode, norms and biases randomised as
    in the tests) at ``inputs(1, side)``, half (floor) of every group's rows zeroed, then ``compress()``,
    ``compress(form="module")`` (the own class) and ``compress(form="graph")``; the own class against the
    zeroed model at ``inputs(2, other_side)`` (a batch of 2 at another size); where it keeps rows, as its
    warning names them. ``more(zeroed, own class)`` adds columns (a library's own uses: generation, saving)."""
    import re

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from helpers import randomize, zero_random_rows

    import otofx
    from otofx.verify import compare

    said = otofx_messages()
    torch.manual_seed(0)
    m = build().eval()
    randomize(m)
    torch.manual_seed(1)
    x, other = inputs(1, side), inputs(2, other_side)
    row = {"model": name, "class": type(m).__name__}
    t0 = time.perf_counter()
    oto = otofx.OTO(m, x)
    row["analysis s"] = round(time.perf_counter() - t0, 1)
    row["front-end"] = oto.frontend
    row["groups"] = len(oto.groups)
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    n = nparams(m)
    t0 = time.perf_counter()
    small = None
    for form in ("auto", "module", "graph"):
        said.clear()
        try:
            got = oto.compress(form=form)
        except Exception as e:  # noqa: BLE001 - the row says what failed
            row[form] = f"FAIL {type(e).__name__}: {str(e)[:120]}"
            continue
        share = round(nparams(got) / n, 3)
        if form == "graph":
            row["graph kept"] = share
            continue
        row[form] = type(got).__name__
        if form == "module":
            small, row["kept"] = got, share
            kept = [s for s in said if "keeps the" in s and "zero row" in s]
            at = re.findall(r"\(at ([^;]+);", kept[0]) if kept else []
            row["kept rows at"] = (at[0] if at else "") + (" + a position table" if kept and "position table" in kept[0]
                                                           else "")
    row["compress s"] = round(time.perf_counter() - t0, 1)
    if small is not None:
        try:
            # NB: a free output (free_outputs) comes back without its removed channels
            compare(m, small, (), other, 1e-4, "the own class", "another input", keep=oto.output_keep(small))
            row["other input"] = "exact"
        except Exception as e:  # noqa: BLE001
            row["other input"] = f"{type(e).__name__}: {str(e)[:120]}"
        if more is not None:
            try:
                row.update(more(m, small))
            except Exception as e:  # noqa: BLE001 - the row says what failed
                row["more"] = f"FAIL {type(e).__name__}: {str(e)[:120]}"
    return row


def library_sweep(script: str, doc: str, models: Callable[[], dict], side: int, other_side: int,
                  library: str, more: Callable[[nn.Module, nn.Module], dict] | None = None,
                  more_keys: tuple = ()) -> None:
    """The command line of a library sweep: ``models()`` is ``{name: (build, inputs)}``, each row
    :func:`compressed_row` in its own process (``--timeout``); ``--only a,b`` picks names (a prefix will do).
    ``library``: the distribution whose version the header prints beside torch's. ``more`` and
    ``more_keys``: extra columns (:func:`compressed_row`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model names (as in the table; a prefix will do)")
    a = apart_args(ap, lambda name: compressed_row(name, *models()[name], side, other_side, more))
    if a is None:
        return
    names = list(models())
    if a.only:
        want = a.only.split(",")
        names = [n for n in names if any(n == w or n.startswith(w) for w in want)]
        if not names:
            raise SystemExit(f"--only: none of {a.only}; choose among {', '.join(models())}")
    report_apart(script, names, a.timeout, LIBRARY_KEYS[:-2] + list(more_keys) + LIBRARY_KEYS[-2:]
                 + (["more"] if more else []),
                 f"torch {torch.__version__}, {library} {importlib.metadata.version(library)}")
