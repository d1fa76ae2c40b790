"""torchvision's task models (detection, segmentation, video, optical flow, quantizable): captured, analysed,
compressed, exact?

Every model of the chosen ``torchvision.models`` task modules is built with random weights (no download:
``weights=None``, and ``weights_backbone=None`` where the builder takes it; the quantizable models with
``quantize=False``, the float model a user prunes before quantising; eval mode; batch-norm statistics,
norm affines and biases randomised as in the tests) and given one example:

* detection: one 3x128x128 image (a list of images); segmentation: 1x3x96x96; video: a clip of 1x3x8x64x64
  (S3D 1x3x16x224x224 and MViT 1x3x16x224x224, the smallest their pooling and position tables take);
  optical flow: two 1x3x128x128 frames (RAFT's smallest); quantizable: 1x3x64x64 (Inception v3 1x3x96x96).

Then:

* ``front-end``: what captured it: ``symbolic_trace``, ``export`` (torch.export; for detectors, draft_export
  along the example's branches: the graph raises on an input that takes another), or ``parts``
  (``otofx/capture_parts.py``: the forward is not captured as a whole, its backbone and heads are;
  ``parts`` names them);
* ``groups``: zero-invariant groups found;
* ``auto`` / ``module``: half (floor) of every group's rows zeroed, ``oto.compress()`` (what it returns)
  and ``oto.compress(form="module")`` (the model's own class), each verified by otofx on the example
  (where a top-k or NMS picks among tied scores, with the full model's decisions replayed: ``replayed``
  counts the compressions that needed it), and ``kept``: the own class's parameters over the model's;
* ``other input``: the own class against the zeroed model on another input (another batch size where
  the model takes one, and another image or clip size): ``exact`` or the error (``otofx.verify.compare``,
  the same check);
* ``analysis s``: ``otofx.OTO(model, example)``; ``compress s``: both ``compress()`` calls.

Each model runs in its own process with a time limit (``--timeout``). ``python bench/tv_tasks.py`` runs
every task; ``--tasks segmentation,video`` picks tasks, ``--only raft_small,s3d`` picks models.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("detection", "segmentation", "video", "optical_flow", "quantization")


def _task_of(name: str) -> str:
    import torchvision

    for task in TASKS:
        if name in torchvision.models.list_models(module=getattr(torchvision.models, task)):
            return task
    raise SystemExit(f"{name}: not a model of torchvision.models.{{{', '.join(TASKS)}}}")


def _build(name: str, task: str):
    import torchvision

    if task == "quantization":
        # NB: list_models names them quantized_*; the builder is the plain name in the quantization module
        return getattr(torchvision.models.quantization, name.removeprefix("quantized_"))(weights=None, quantize=False)
    kw = {"weights": None}
    if task in ("detection", "segmentation"):
        kw["weights_backbone"] = None
    if task == "segmentation" and not name.startswith("lraspp"):
        kw["aux_loss"] = True
    return torchvision.models.get_model(name, **kw)


def _inputs(name: str, task: str) -> tuple:
    """``(example, other input)``, each a tuple of positional inputs."""
    import torch

    r = torch.randn
    if task == "detection":
        return ([r(3, 128, 128)],), ([r(3, 160, 96)],)
    if task == "segmentation":
        return (r(1, 3, 96, 96),), (r(2, 3, 80, 112),)
    if task == "video":
        if name.startswith(("mvit", "s3d")):
            # NB: MViT's position tables fix the clip at 16x224x224; S3D's last pooling needs 224 wide
            other = r(2, 3, 16, 224, 224) if name.startswith("mvit") else r(2, 3, 24, 256, 240)
            return (r(1, 3, 16, 224, 224),), (other,)
        return (r(1, 3, 8, 64, 64),), (r(2, 3, 6, 48, 80),)
    if task == "optical_flow":
        return (r(1, 3, 128, 128), r(1, 3, 128, 128)), (r(2, 3, 160, 136), r(2, 3, 160, 136))
    if name.endswith("inception_v3"):
        return (r(1, 3, 96, 96),), (r(2, 3, 128, 112),)
    return (r(1, 3, 64, 64),), (r(2, 3, 96, 80),)


def one(name: str) -> dict:
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from _common import otofx_messages
    from helpers import randomize, zero_random_rows

    import otofx
    from otofx.capture_parts import PARTS
    from otofx.verify import compare

    said = otofx_messages()
    task = _task_of(name)
    torch.manual_seed(0)
    m = _build(name, task).eval()
    randomize(m)
    x, other = _inputs(name, task)
    row = {"task": task, "model": name}
    t0 = time.perf_counter()
    oto = otofx.OTO(m, x)
    row["analysis s"] = round(time.perf_counter() - t0, 1)
    parts = oto.graph_module.meta.get(PARTS)
    row["front-end"] = oto.frontend + (f" ({', '.join(parts.paths)})" if parts else "")
    row["groups"] = len(oto.groups)
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    n = sum(p.numel() for p in m.parameters())
    t0 = time.perf_counter()
    for form in ("auto", "module"):
        try:
            small = oto.compress(form=form)
            row[form] = type(small).__name__
        except Exception as e:  # noqa: BLE001 - the row says what failed
            row[form] = f"FAIL {type(e).__name__}: {str(e)[:120]}"
            small = None
    row["compress s"] = round(time.perf_counter() - t0, 1)
    if small is not None:
        row["kept"] = round(sum(p.numel() for p in small.parameters()) / n, 3)
        try:
            compare(m, small, other, None, 1e-4, "the own class", "another input")
            row["other input"] = "exact"
        except Exception as e:  # noqa: BLE001
            row["other input"] = f"{type(e).__name__}: {str(e)[:120]}"
    row["replayed"] = sum("decision(s) on float values" in s for s in said)
    return row


def main() -> None:
    from _common import apart_args, report_apart

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    ap.add_argument("--only", default="", help="comma-separated model names (overrides --tasks)")
    a = apart_args(ap, one)
    if a is None:
        return
    import torchvision

    if a.only:
        names = a.only.split(",")
    else:
        tasks = a.tasks.split(",")
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise SystemExit(f"--tasks: unknown {', '.join(unknown)}; choose among {', '.join(TASKS)}")
        names = [n for t in tasks for n in torchvision.models.list_models(module=getattr(torchvision.models, t))]
    keys = ["task", "model", "front-end", "groups", "auto", "module", "kept", "other input", "replayed", "analysis s",
            "compress s"]
    report_apart(__file__, names, a.timeout, keys,
                 f"torch {__import__('torch').__version__}, torchvision {torchvision.__version__}")


if __name__ == "__main__":
    main()
