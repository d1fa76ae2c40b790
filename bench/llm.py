"""A 1.1B LLaMA on the CPU: analysis and compress time, compress peak memory, generation speed;
analysis of 7B and 70B configs on the meta device.

Cases, each in a fresh subprocess (so its peak RSS is its own):

* ``float32`` / ``bfloat16``: transformers' ``LlamaForCausalLM`` from a TinyLlama-1.1B-shaped config
  (hidden 2048, 22 layers, 32 query / 4 key-value heads, intermediate 5632, vocab 32000), random
  weights built directly in the dtype (RMSNorm weights uniform in [0.5, 1.5]); input ids [1, 16].
  ``otofx.OTO(model, ids)`` (analysis), a random half of every group's rows zeroed, then
  ``oto.compress()`` (which verifies: float32 to 1e-4, bfloat16 to its dtype tolerance). Peak RSS
  of analysis and of compress is the process's VmHWM, reset before each (``/proc/self/clear_refs``);
  "x weights" divides it by the dense weights' bytes (parameters and buffers), "extra" subtracts the
  RSS before compress (the process, torch, the dense model) first: what compress() itself adds, which
  issue 13's rule bounds by the compressed weights plus the largest single tensor (the dense weights
  are already there); the "targets" line checks it per run. ``--forms auto graph`` runs each dense
  case with both ``compress(form=...)`` paths (the model's own class, the GraphModule). Generation: ``generate()``
  (greedy, KV cache) when the compressed model has it, else a greedy no-cache loop over a
  fixed 16-token window (the captured graph's input shape), the same loop for the dense model's
  captured graph and the compressed GraphModule; tokens/s over ``--new-tokens`` tokens, and whether
  both produced the same tokens.
* ``meta 7B`` / ``meta 70B``: LLaMA-2-7B (32 layers, 4096, 32 heads, 11008) and LLaMA-2-70B (80 layers,
  8192, 64 / 8 heads, 28672) configs built under ``torch.device("meta")``; ``otofx.OTO`` time and the
  process's peak RSS (``ru_maxrss``), no weights allocated.

Run (26 minutes on 2 cores at load average 15; 1.1B float32 compress needs ~8 GB of RAM)::

    python bench/llm.py
    python bench/llm.py --cases float32 meta70b --new-tokens 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

CASES = ("float32", "bfloat16", "meta7b", "meta70b")
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048)
LLAMA2 = {
    "meta7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096),
    "meta70b": dict(vocab_size=32000, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                    num_key_value_heads=8, intermediate_size=28672, max_position_embeddings=4096),
}
PROMPT = 16
GB = 1e9


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def nbytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Cases (run in a child process)
# ---------------------------------------------------------------------------------------------


def build_llama(dtype: torch.dtype, layers: int):
    import transformers

    config = transformers.LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers})
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # NB: weights are allocated in the dtype: no float32 copy first
    try:
        model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights: not all ones
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def greedy_window(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list]:
    """Greedy decoding without a cache over a fixed-length window; (seconds, tokens)."""
    window, out = ids.clone(), []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(window)["logits"]
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            window = torch.cat([window[:, 1:], nxt], 1)
    return time.perf_counter() - t0, out


def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - t0, seq[0, ids.shape[1]:].tolist()


def largest_tensor(model: torch.nn.Module) -> int:
    return max((t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())), default=0)


def run_dense(dtype_name: str, args) -> dict:
    import otofx
    from _common import zero_half_rows

    dtype = getattr(torch, dtype_name)
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    model = build_llama(dtype, args.layers)
    res = {"case": dtype_name, "form": args.form, "build_s": time.perf_counter() - t0, "weights": nbytes(model),
           "rss_process": rss0, "params": sum(p.numel() for p in model.parameters()),
           "largest": largest_tensor(model)}
    ids = torch.randint(0, TINYLLAMA["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(2))

    reset_peak()
    t0 = time.perf_counter()
    oto = otofx.OTO(model, ids)
    res["analysis_s"] = time.perf_counter() - t0
    res["analysis_peak"] = _status("VmHWM")
    res["groups"], res["rows"] = len(oto.groups), sum(z.rows for z in oto.groups)
    res["rows_zeroed"] = zero_half_rows(model, oto.groups)

    res["rss_before_compress"] = _status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    try:
        small = oto.compress(form=args.form)
    except otofx.OTOError as e:
        res["compress_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        res["compress_peak"] = _status("VmHWM")
        return res
    res["compress_s"] = time.perf_counter() - t0
    res["compress_peak"] = _status("VmHWM")
    res["small_bytes"] = nbytes(small)
    res["small_params"] = sum(p.numel() for p in small.parameters())
    res["rel_error"] = oto.verify(small)
    try:
        from otofx.pipeline import compute_dtype, contraction_depth, fitted_rtol

        res["tolerance"] = fitted_rtol(1e-4, compute_dtype(small), contraction_depth(oto.graph_module))
    except ImportError:  # a baseline checkout from before the dtype-fitting tolerance
        res["tolerance"] = 1e-4

    torch.manual_seed(0)
    if args.new_tokens <= 0:
        return res
    if hasattr(small, "generate"):
        res["gen_method"] = "generate() (KV cache)"
        dense_s, dense_tok = generate(model, ids, args.new_tokens)
        small_s, small_tok = generate(small, ids, args.new_tokens)
    else:
        res["gen_method"] = "greedy loop, no cache, 16-token window (compressed is a GraphModule)"
        greedy_window(oto.graph_module, ids, 1)  # warm-up
        greedy_window(small, ids, 1)
        dense_s, dense_tok = greedy_window(oto.graph_module, ids, args.new_tokens)
        small_s, small_tok = greedy_window(small, ids, args.new_tokens)
    res["tok_s_dense"] = args.new_tokens / dense_s
    res["tok_s_small"] = args.new_tokens / small_s
    res["same_tokens"] = dense_tok == small_tok
    return res


def run_meta(name: str, args) -> dict:
    import transformers

    import otofx

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA2[name]))
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    oto = otofx.OTO(model, ids)
    return {"case": name, "build_s": build_s, "analysis_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()), "groups": len(oto.groups),
            "rows": sum(z.rows for z in oto.groups), "pass_s": {r.name: r.seconds for r in oto.state.records},
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---------------------------------------------------------------------------------------------
# The parent: one subprocess per case, then the tables
# ---------------------------------------------------------------------------------------------


def child(case: str, args, python: str | None = None, form: str = "auto") -> dict:
    cmd = [python or sys.executable, os.path.abspath(__file__), "--child", case, "--layers", str(args.layers),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--form", form]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"case": case, "failed": " | ".join(tail)}


def _label(r: dict) -> str:
    form = f" form={r['form']}" if r.get("form", "auto") != "auto" else ""
    return r["case"] + form + (" (baseline)" if r.get("baseline") else "")


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def tables(results: list, fmt: str) -> str:
    from tabulate import tabulate

    dense = [r for r in results if r["case"] in ("float32", "bfloat16")]
    rows = []
    for r in dense:
        if "failed" in r:
            rows.append([_label(r), "failed: " + r["failed"][:120]] + [""] * 13)
            continue
        w = r["weights"]
        peak = r.get("compress_peak")
        extra = None if peak is None else peak - r["rss_before_compress"]
        rows.append([
            _label(r), f"{r['params'] / 1e9:.2f}B", _f(w / GB, ".2f"), _f(r["analysis_s"], ".1f"),
            _f(r["analysis_peak"] / w, ".2f"),
            _f(r.get("compress_s"), ".1f") or "failed", _f(peak / GB, ".2f"), _f(peak / w, ".2f"), _f(extra / w, ".2f"),
            _f(r.get("small_bytes", 0) / w if "small_bytes" in r else None, ".3f"),
            (f"{r['rel_error']:.2g} <= {r['tolerance']:.2g}" if "rel_error" in r else r.get("compress_error", "")[:60]),
            _f(r.get("tok_s_dense"), ".2f"), _f(r.get("tok_s_small"), ".2f"),
            _f(r["tok_s_small"] / r["tok_s_dense"] if "tok_s_dense" in r else None, ".2f"),
            {True: "yes", False: "no"}.get(r.get("same_tokens"), ""),
        ])
    out = [] if not rows else [tabulate(rows, headers=["dtype", "params", "weights GB", "analysis s", "analysis peak x weights",
                                   "compress s", "compress peak GB", "x weights", "extra x weights",
                                   "compressed x weights", "rel. error <= tol", "tok/s dense", "tok/s compressed",
                                   "x dense", "same tokens"], tablefmt=fmt)]
    gen = sorted({r["gen_method"] for r in dense if "gen_method" in r})
    if gen:
        out.append("generation: " + "; ".join(gen))
    meta = [r for r in results if r["case"].startswith("meta")]
    mrows = []
    for r in meta:
        if "failed" in r:
            mrows.append([r["case"], "failed: " + r["failed"][:120], "", "", "", "", ""])
            continue
        ps = r["pass_s"]
        mrows.append([r["case"][4:].upper(), f"{r['params'] / 1e9:.1f}B", f"{r['params'] * 2 / GB:.0f}",
                      f"{r['analysis_s']:.1f}", " / ".join(f"{ps.get(k, 0):.1f}" for k in ("capture", "propagate_shapes", "find_zigs")),
                      f"{r['peak'] / GB:.2f}", f"{r['peak'] / (r['params'] * 2):.4f}", r["groups"], r["rows"]])
    if mrows:
        out.append(tabulate(mrows, headers=["meta config", "params", "bf16 weights GB", "analysis s",
                                            "capture / shapes / zigs s", "peak RSS GB", "x bf16 weights", "groups",
                                            "rows"], tablefmt=fmt))
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--layers", type=int, default=TINYLLAMA["num_hidden_layers"], help="decoder layers of the 1.1B model")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated per model (default 8; 0: no generation)")
    ap.add_argument("--forms", nargs="+", default=["auto"], choices=["auto", "graph"],
                    help="compress(form=...) of the dense cases, one run each (default auto)")
    ap.add_argument("--form", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--baseline-python", metavar="PYTHON",
                    help="also run the float32 case with this interpreter's otofx (e.g. an older checkout's venv)")
    ap.add_argument("--format", default="github")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.child:
        res = run_meta(args.child, args) if args.child.startswith("meta") else run_dense(args.child, args)
        print("RESULT " + json.dumps(res))
        return
    from _common import machine

    load0 = os.getloadavg()
    t0 = time.time()
    results = []
    if args.baseline_python and "float32" in args.cases:
        results.append({**child("float32", args, args.baseline_python), "baseline": args.baseline_python})
    for c in args.cases:
        results += [child(c, args, form=f) for f in (args.forms if not c.startswith("meta") else ["auto"])]
    print(f"$ python {' '.join(sys.argv)}")
    print(tables(results, args.format))
    print(f"\nload average (1/5/15 min) before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()) + f"; {os.cpu_count()} cores; took {time.time() - t0:.0f} s")
    print(f"machine: {machine()}")
    targets = []
    for r in results:
        if r["case"] == "float32" and "compress_peak" in r:
            over = (r["compress_peak"] - r["rss_before_compress"] + r["weights"]) / r["weights"]
            targets.append(f"{_label(r)} compress peak {r['compress_peak'] / r['weights']:.2f}x weights, "
                           f"{over:.2f}x over the process before compress (target <= 1.6)")
        if "compress_peak" in r and "small_bytes" in r and "largest" in r:
            inc, bound = r["compress_peak"] - r["rss_before_compress"], r["small_bytes"] + r["largest"]
            targets.append(f"{_label(r)} compress() increment {inc / GB:.2f} GB ({inc / r['weights']:.3f}x weights) "
                           f"{'<=' if inc <= bound else '>'} compressed {r['small_bytes'] / GB:.2f} + largest tensor "
                           f"{r['largest'] / GB:.3f} GB ({'met' if inc <= bound else 'NOT met'})")
        if r["case"] == "bfloat16":
            targets.append("bfloat16 compress " + ("succeeds" if "compress_s" in r else "FAILS"))
        if r["case"] == "meta70b" and "analysis_s" in r:
            targets.append(f"70B meta analysis {r['analysis_s']:.0f} s (target < 60), {r['peak'] / GB:.2f} GB (target < 2)")
    if targets:
        print("targets: " + "; ".join(targets))


if __name__ == "__main__":
    main()
