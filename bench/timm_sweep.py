"""timm's architecture families, random weights: analysed, compressed, exact, own class?

One model of each of 98 timm families (CNNs, ViTs, hybrids, MLP-mixers, MetaFormers, recurrent
Sequencer), built with ``pretrained=False`` (no download), ``num_classes=10``, dropout and drop path
off, at the smallest input side it accepts from 64, 96, 128, 224 (``SIZE_HINT`` first; ``img_size``
passed where the model takes it). Norm statistics, affines, biases and constant-initialised
parameters randomised (``hf_sweep._randomize``), eval mode, input 2x3xSxS:

* ``groups`` / ``rows``: ``otofx.OTO(model, x)``; ``top pin``: the pin reason holding most channels
  (``[op] reason xcount/channels``), the model output's own pin left out;
* ``form`` / ``kept``: half (floor) of every group's rows zeroed, ``oto.compress()``: ``own`` (the
  model's class) or ``graph`` (its failure column: compress()'s warning saying why); ``kept`` is the
  compressed model's parameter count over the dense one's (0.25 is what a model whose every weight
  sits between two prunable widths gives);
* ``rel err``: max|diff| / max(1, max|y|) against the zeroed full model over three inputs: the
  example, a batch of 3, and (where the model takes it) a side 32 larger; exact at <= 1e-4;
* ``train``: the same in train mode (batch statistics; dropout is off), on a batch of 2, with both
  models in float64 (in float32, batch statistics of 2 samples turn rounding into 1e-3 differences
  in deep nets, between any two orders of the same sums).

Each model runs in its own forked process with a time limit (``--timeout``), ``--jobs`` at a time
(``hf_sweep.sweep``). ``python bench/timm_sweep.py`` runs them all and prints the table and the
totals; ``--only resnet18d,vit_tiny_patch16_224`` picks models; ``--markdown FILE`` also writes the
output; ``--save FILE`` appends each row to a JSON-lines file and skips the models already there.

Internals:
    * Nothing is timed: ``s`` is the wall time of a model's whole check (build to train mode), under
      whatever else runs, for orientation only.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import nparams, zero_half_rows  # noqa: E402
from hf_sweep import _randomize, read_rows, save_row, sweep  # noqa: E402

MODELS = """
resnet18d resnext26ts seresnext26d_32x4d efficientnet_b0 mobilenetv3_small_050 mobilenetv4_conv_small
ghostnet_050 ghostnetv2_100 repghostnet_050 rexnet_100 regnetx_002 regnety_002 cspresnet50 dla34
hrnet_w18_small densenet121 lcnet_050 mnasnet_050 semnasnet_050 tinynet_e hgnetv2_b0 starnet_s1
convnext_atto convnextv2_atto edgenext_xx_small fastvit_t8 repvit_m1 efficientformer_l1 efficientformerv2_s0
levit_128s mobilevit_xxs mobilevitv2_050 poolformer_s12 poolformerv2_s12 mixer_s32_224 resmlp_12_224
gmlp_ti16_224 vit_tiny_patch16_224 deit_tiny_patch16_224 eva02_tiny_patch14_224 coat_lite_tiny pit_ti_224
crossvit_tiny_240 cait_xxs24_224 xcit_nano_12_p16_224 tiny_vit_5m_224 mambaout_femto inception_next_atto
efficientvit_m0 efficientvit_b0 shvit_s1 fasternet_t0 selecsls42b nf_regnet_b0 ese_vovnet19b_dw
resnet10t res2net50_14w_8s skresnet18 resnest14d dpn48b cs3darknet_focus_s regnetz_b16 gernet_s repvgg_a0
mobileone_s0 efficientnetv2_rw_t fbnetv3_b xception41 inception_v3 rdnet_tiny tresnet_m dm_nfnet_f0 hgnet_tiny
halonet26t botnet26t_256 lambda_resnet26t convformer_s18 caformer_s18 fastvit_mci0 nextvit_small visformer_tiny
pvt_v2_b0 twins_pcpvt_small nest_tiny swin_tiny_patch4_window7_224 gcvit_xxtiny maxvit_nano_rw_256
coatnet_nano_rw_224 davit_tiny focalnet_tiny_srf hiera_tiny_224 mvitv2_tiny volo_d1_224 sequencer2d_s
vit_little_patch16_reg4_gap_256 beit_base_patch16_224 convmixer_768_32 ese_vovnet39b
""".split()

# the first input side tried (else 64, 96, 128, 224): models whose position tables fix it
SIZE_HINT = {"halonet26t": 256, "levit_128s": 128, "efficientformer_l1": 224, "efficientformerv2_s0": 224,
             "crossvit_tiny_240": 240, "tiny_vit_5m_224": 224, "efficientvit_m0": 224, "shvit_s1": 224}
TOL = 1e-4


@dataclasses.dataclass
class TimmRow:
    task: str
    model_type: str  # the timm name (hf_sweep.sweep's field names)
    cls: str = ""
    built: bool = False
    analysed: bool = False
    exact: bool = False
    side: int = 0
    groups: int = 0
    rows: int = 0
    form: str = ""
    kept: float | None = None
    err: float | None = None
    train: float | None = None
    top_pin: str = ""
    why: str = ""
    seconds: float = 0.0


def _rel(ref, got) -> float:
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    got = got if isinstance(got, torch.Tensor) else got[0]
    ref, got = ref.detach().double(), got.detach().double()
    return float((ref - got).abs().max() / max(1.0, float(ref.abs().max())))


def _build(name: str):
    import timm

    sides = [SIZE_HINT[name]] if name in SIZE_HINT else []
    sides += [s for s in (64, 96, 128, 224) if s not in sides]
    last = ""
    for side in sides:
        # NB: each model takes some of these keywords: dropout and drop path off wherever it takes them
        for kw in ({"img_size": side, "drop_rate": 0.0, "drop_path_rate": 0.0}, {"drop_rate": 0.0, "drop_path_rate": 0.0},
                   {"img_size": side, "drop_rate": 0.0}, {"drop_rate": 0.0}, {"img_size": side}, {}):
            torch.manual_seed(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
                    with torch.no_grad():
                        m(torch.randn(1, 3, side, side))
                return m, side, "img_size" in kw
            except TypeError:
                continue  # NB: a keyword the model does not take: the next set
            except Exception as e:  # noqa: BLE001
                last = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
                break  # NB: this side does not run: the next one
    raise RuntimeError(f"no input side runs ({last})")


def _top_pin(oto) -> str:
    agg: dict = {}
    for p in oto.pinned:
        if p.reason == "model output":
            continue
        a = agg.setdefault(f"[{p.op}] {p.reason}", [0, 0])
        a[0] += 1
        a[1] += p.channels
    if not agg:
        return ""
    k, (n, ch) = max(agg.items(), key=lambda kv: kv[1][1])
    return f"{k[:70]} x{n}/{ch}"


class _Said(logging.Handler):
    """The messages otofx logs at WARNING and above while it is attached."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_one(task: str, name: str, cls: str = "", peers: bool = False) -> TimmRow:
    import copy

    import otofx

    t0 = time.monotonic()
    row = TimmRow(task, name)
    try:
        model, side, _ = _build(name)
    except Exception as e:  # noqa: BLE001
        row.why = f"build: {e}"[:160]
        return row
    row.built, row.cls, row.side = True, type(model).__name__, side
    _randomize(model)
    # NB: _build ran the model in eval mode: the attention biases EfficientViT (MSRA), LeViT, TinyViT
    # and EfficientFormer gathered then are cached and would be read by the capture (a constant of
    # the graph, no longer the model's function after the round trip below): dropped before it too
    model.train()
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, side, side)
    try:
        oto = otofx.OTO(model, x)
        row.analysed, row.groups, row.rows = True, len(oto.groups), sum(z.rows for z in oto.groups)
        row.top_pin = _top_pin(oto)
        zero_half_rows(model, oto.groups, seed=1)
        # NB: LeViT, TinyViT and EfficientFormer cache their gathered attention biases in eval mode and
        # drop the cache on train(): without the round trip the dense reference would use the biases
        # from before the weights were randomised and zeroed
        model.train()
        model.eval()
        said = _Said()
        logging.getLogger("otofx").addHandler(said)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small = oto.compress()
        finally:
            logging.getLogger("otofx").removeHandler(said)
        row.form = "own" if type(small) is type(model) else "graph"
        if row.form == "graph":  # NB: why not the own class: compress()'s warning (the row had none)
            row.why = next((m.split(": ", 2)[-1] for m in reversed(said.messages)
                            if "returns a torch.fx GraphModule" in m), "")[:300]
        row.kept = round(nparams(small) / nparams(model), 3)
        inputs = [x, torch.randn(3, 3, side, side)]
        with torch.no_grad():
            try:
                model(torch.randn(1, 3, side + 32, side + 32))
                inputs.append(torch.randn(2, 3, side + 32, side + 32))
            except Exception:  # noqa: BLE001  (a model fixed to its side)
                pass
            row.err = max(_rel(model(i), small(i)) for i in inputs)
        # NB: in float64: batch statistics of 2 samples amplify float32 rounding, by 1e-3 and more after
        # 30 layers (ConvMixer), in the full model as much as in the compressed one
        full, comp = copy.deepcopy(model).double().train(), copy.deepcopy(small).double().train()
        xt = torch.randn(2, 3, side, side, dtype=torch.float64)
        row.train = _rel(full(xt), comp(xt))
        row.exact = row.err <= TOL and row.train <= TOL and row.kept < 1
        if not row.exact:
            row.why = f"mismatch: eval {row.err:.1e}, train {row.train:.1e}, kept {row.kept}"
    except Exception as e:  # noqa: BLE001
        row.why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:140]}"
    row.seconds = round(time.monotonic() - t0, 1)
    return row


def table(rows: list, fmt: str = "github") -> str:
    from tabulate import tabulate

    head = ["model", "class", "side", "groups", "rows", "form", "kept", "rel err", "train", "s", "top pin / failure"]
    body = [[r.model_type, r.cls, r.side or "", r.groups or "", r.rows or "", r.form, r.kept if r.kept is not None else "",
             f"{r.err:.1e}" if r.err is not None else "", f"{r.train:.1e}" if r.train is not None else "",
             r.seconds, (r.why if r.why else r.top_pin).replace("|", "/")] for r in rows]
    return tabulate(body, head, tablefmt=fmt)


def summary(rows: list) -> str:
    import statistics

    built = [r for r in rows if r.built]
    ok = [r for r in built if r.exact]
    own = [r for r in ok if r.form == "own"]
    kept = sorted(r.kept for r in ok)
    return "\n".join([
        f"models: {len(rows)}; built: {len(built)}; exact in eval and train mode: {len(ok)} / {len(built)} "
        f"({len(own)} in their own class, {len(ok) - len(own)} as a graph)",
        f"mismatches: {sum(1 for r in built if r.why.startswith('mismatch'))} (target 0); failures: "
        f"{sum(1 for r in built if r.why and not r.exact and not r.why.startswith('mismatch'))}",
        f"parameters kept at half of every group's rows zeroed: median {statistics.median(kept):.3f}, "
        f"<= 0.30 on {sum(1 for k in kept if k <= 0.30)} / {len(kept)}" if kept else "no exact model",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated timm model names (default: all)")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per model")
    ap.add_argument("--markdown", default="", help="also write the table and summary to this file")
    ap.add_argument("--save", default="", help="append each finished row to this JSON-lines file (resumes)")
    a = ap.parse_args(argv)
    import timm  # noqa: F401  (imported once, before forking)

    names = [n for n in a.only.split(",") if n] or MODELS
    items = [("timm", n, "") for n in names]
    before = read_rows(a.save, TimmRow) if a.save and os.path.exists(a.save) else []
    have = {r.model_type for r in before}
    done: list = []

    def progress(r: TimmRow):
        done.append(r)
        print(f"[{len(done)}/{len(items) - len(have)}] {r.model_type}: "
              f"{'exact ' + r.form if r.exact else r.why[:100]}", file=sys.stderr, flush=True)
        if a.save:
            save_row(a.save, r)

    t0 = time.time()
    rows = before + sweep([it for it in items if it[1] not in have], a.jobs, a.timeout, False, progress,
                          fn=run_one, row_cls=TimmRow)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: order.get(r.model_type, -1))
    load = os.getloadavg()
    import timm as _timm

    text = "\n".join([table(rows), "", summary(rows),
                      f"timm {_timm.__version__}, torch {torch.__version__}; took {time.time() - t0:.0f} s with "
                      f"{a.jobs} jobs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"])
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
