"""Saving and loading compressed models without pickle: ``otofx.save(model, path)``, ``otofx.load(path)``.

A compressed model is its dense class with narrower layers, so ``torch.save`` of the weights alone
cannot be loaded into a freshly built instance, and ``torch.save`` of the whole object is a pickle
(``torch.load``'s default ``weights_only=True`` refuses it, and loading it runs code from the file).
``save`` writes a folder of data only:

* ``model.safetensors``: every tensor of the model (parameters, buffers, persistent or not, and
  tensor attributes), each stored once: a tensor reachable under several names (GPT-2's
  ``lm_head.weight`` and ``transformer.wte.weight``) is stored under its first name;
* ``otofx.json``: the model's class, per module its class, its simple attributes (ints, floats,
  bools, strings, None, and tuples/lists of those), the simple fields of the settings records it holds
  (a dataclass or namespace its forward reads sizes from: litgpt's ``self.config``; a module whose
  fields differ from the fresh instance's gets its own copy), and per tensor its kind, shape, dtype,
  ``requires_grad`` and, for a second name of one tensor, the name it is the same as;
* ``config.json``: for a Hugging Face model (``transformers.PreTrainedModel``), its config.

``load`` rebuilds the structure from a dense instance: a Hugging Face model is built from the
saved config on the meta device (no dense weights are allocated); any other model is passed as
``model=``, a freshly built dense instance of the saved class (on any device, the meta device
included), which is **resized in place** and returned. Each module gets the saved attributes that
differ from the fresh instance's, modules whose class changed under compression (``nn.MultiheadAttention``
-> :class:`otofx.passes.modules.PrunedMultiheadAttention`) are rebuilt from their recorded
constructor arguments, and every tensor is replaced by the saved one (a Parameter stays a Parameter
with its ``requires_grad``; shared tensors are shared again).

Internals:
    * No pickle anywhere: the weights are read with ``safetensors``, the rest with ``json``. The
      only classes ever constructed from what the files say are a ``transformers`` model class
      (looked up as an attribute of the ``transformers`` package and checked to be a
      ``PreTrainedModel``) and the otofx modules in ``_REBUILD``; any other class is compared by
      name with the given ``model=``, never imported.
    * ``load`` checks everything (files, class, every module path, parameter kind and rank, that no
      tensor of the fresh instance is left without a saved value) before it changes ``model=``:
      a failed load leaves it as it was.
    * Tuples and non-finite floats have no JSON form: they are written as ``{"tuple": [...]}`` and
      ``{"float": "inf"}``.
    * # NB: a ``torch.fx.GraphModule`` is refused: its ``forward`` is generated Python code, and
      storing code to run at load time is what this format exists to avoid. Save the module form
      (``oto.compress()`` returns the model's own class) instead.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from otofx import fxcompat
from otofx.errors import InputError
from otofx.passes.resize import is_record, record_fields

log = logging.getLogger("otofx")

WEIGHTS = "model.safetensors"
MANIFEST = "otofx.json"
HF_CONFIG = "config.json"
FORMAT = "otofx.save"
FORMAT_VERSION = 1
_OUR_FILES = (WEIGHTS, MANIFEST, HF_CONFIG)

# attributes every nn.Module has (hooks, registries): not part of what a module computes
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}


def _rebuildable() -> dict:
    """otofx modules that may replace a stock one, by (module, qualname): built from ``init_kwargs()``."""
    from otofx.passes.modules import (PrunedGlobalResponseNorm, PrunedGroupNorm, PrunedLayerNorm, PrunedLayerNorm2d,
                                      PrunedMultiheadAttention, PrunedOwnLayerNorm, PrunedRelativeAttention, PrunedRNN,
                                      PrunedStdConv2d, PrunedWindowAttention, PrunedWindowAttention3d)

    return {_type_name(c): c for c in (PrunedMultiheadAttention, PrunedWindowAttention, PrunedWindowAttention3d,
                                       PrunedRelativeAttention, PrunedLayerNorm, PrunedLayerNorm2d, PrunedRNN,
                                       PrunedGroupNorm, PrunedGlobalResponseNorm, PrunedStdConv2d, PrunedOwnLayerNorm)}


def _type_name(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _fmt(name: tuple | list) -> str:
    return f"{name[0]}.{name[1]}"


# ---------------------------------------------------------------------------------------------
# Simple attribute values <-> JSON
# ---------------------------------------------------------------------------------------------


class _NotSimple(Exception):
    pass


def _encode(v):
    t = type(v)
    if v is None or t in (bool, int, str):
        return v
    if t is float:
        return v if math.isfinite(v) else {"float": repr(v)}
    if t is tuple:
        return {"tuple": [_encode(x) for x in v]}
    if t is list:
        return [_encode(x) for x in v]
    raise _NotSimple


def _decode(v):
    if isinstance(v, dict):
        if "tuple" in v:
            return tuple(_decode(x) for x in v["tuple"])
        return float(v["float"])
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def _hf_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # an HF model means transformers is imported
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _record_fields(rec) -> dict:
    """The simple fields of a record (a dataclass or namespace a module reads sizes from: litgpt's
    ``self.config``), encoded; the others (dicts, classes) are not stored."""
    out = {}
    for k, v in record_fields(rec):
        try:
            out[k] = _encode(v)
        except _NotSimple:
            continue
    return out


def _describe(model: nn.Module):
    """(modules, tensors, blobs): the manifest's two lists and the tensors to write, by name."""
    rebuild = _rebuildable()
    modules, tensors, blobs = [], [], {}
    seen: dict[int, str] = {}  # id(tensor) -> the name it was stored under
    storages: set = set()
    for path, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, fx.GraphModule):
            where = "the model" if not path else f"submodule '{path}'"
            raise InputError(
                f"{where} is a torch.fx.GraphModule: its forward is generated code, which otofx.save does not "
                "store (loading it would run code from the file, as a pickle does). Save the module form "
                "instead: `small = oto.compress(form='module')` (the model's own class), then "
                "`otofx.save(small, path)`; the graph form is recovered by compressing "
                "or tracing the loaded module")
        if callable(vars(mod).get("forward")):
            raise InputError(f"{'the model' if not path else f'submodule {path!r}'} has its own `forward` (an instance "
                             "attribute, not its class's): otofx.save stores data, not code, and the loaded model "
                             "would run its class's forward; save a model whose modules compute with their "
                             "classes' code")
        entry = {"path": path, "type": list(_type_name(type(mod))), "attrs": {}}
        for key, value in vars(mod).items():
            if key in _MODULE_INTERNALS or isinstance(value, torch.Tensor):
                continue
            if is_record(value):
                entry.setdefault("records", {})[key] = _record_fields(value)
                continue
            try:
                entry["attrs"][key] = _encode(value)
            except _NotSimple:
                continue
        if _type_name(type(mod)) in rebuild:
            entry["init"] = {k: _encode(v) for k, v in mod.init_kwargs().items()}
        modules.append(entry)
        found = [(n, t, "parameter") for n, t in mod._parameters.items()]
        found += [(n, t, "buffer") for n, t in mod._buffers.items()]
        found += [(n, t, "tensor") for n, t in vars(mod).items()
                  if isinstance(t, torch.Tensor) and n not in _MODULE_INTERNALS]
        for attr, t, kind in found:
            name = f"{path}.{attr}" if path else attr
            rec = {"name": name, "module": path, "attr": attr, "kind": kind}
            if kind == "buffer":
                rec["persistent"] = fxcompat.buffer_persistent(mod, attr)
            if t is None:
                rec["none"] = True
                tensors.append(rec)
                continue
            if t.device.type == "meta":
                raise InputError(f"tensor '{name}' is on the meta device: there is nothing to save; "
                                 "materialise the model first")
            if kind == "parameter":
                rec["requires_grad"] = bool(t.requires_grad)
            rec["shape"], rec["dtype"] = list(t.shape), _dtype_name(t.dtype)
            if id(t) in seen:
                rec["same_as"] = seen[id(t)]
            else:
                seen[id(t)] = name
                data = t.detach().to("cpu").contiguous()
                key = (data.untyped_storage().data_ptr(), data.untyped_storage().nbytes())
                if data.numel() and key in storages:  # a view of a tensor already written
                    data = data.clone()
                storages.add((data.untyped_storage().data_ptr(), data.untyped_storage().nbytes()))
                blobs[name] = data
            tensors.append(rec)
    return modules, tensors, blobs


def save(model: nn.Module, path) -> Path:
    """Write ``model`` to the folder ``path`` (created if needed) as safetensors + JSON; returns the folder.

    Reload it with :func:`load`. Only ``model.safetensors``, ``otofx.json`` and, for a Hugging Face
    model, ``config.json`` are written; a folder holding other files is refused.
    """
    from safetensors.torch import save_file

    from otofx import __version__

    if not isinstance(model, nn.Module):
        raise InputError(f"otofx.save needs a torch.nn.Module, got {type(model).__name__}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"'{folder}' is a file: otofx.save writes a folder; give a new or empty folder's path")
    if folder.is_dir():
        other = sorted(p.name for p in folder.iterdir() if p.name not in _OUR_FILES)
        if other:
            raise InputError(f"'{folder}' holds files otofx.save did not write ({', '.join(other[:5])}): "
                             "give a new or empty folder, or a folder of an earlier otofx.save")
    modules, tensors, blobs = _describe(model)
    hf = _hf_model(model)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "otofx_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "class": list(_type_name(type(model))),
        "huggingface": ({"config": HF_CONFIG,
                         "attn_implementation": getattr(model.config, "_attn_implementation", None),
                         # NB: a build on the meta device picks grouped_mm for experts, which needs
                         # 16-byte strides that pruned expert widths need not have
                         "experts_implementation": _experts_implementation(model.config)} if hf else None),
        "modules": modules, "tensors": tensors,
    }
    folder.mkdir(parents=True, exist_ok=True)
    # write beside, then rename: an interrupted save never leaves a mixed folder
    writes = [(WEIGHTS, lambda p: save_file(blobs, str(p), metadata={"format": "pt", "otofx": __version__})),
              (MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1, allow_nan=False)))]
    if hf:
        writes.append((HF_CONFIG, lambda p: p.write_text(model.config.to_json_string(use_diff=False))))
    elif (folder / HF_CONFIG).exists():
        (folder / HF_CONFIG).unlink()  # left by an earlier save of a Hugging Face model
    for fname, write in writes:
        tmp = folder / f".{fname}.tmp"
        write(tmp)
        os.replace(tmp, folder / fname)
    log.info("saved %s (%d tensors, %d stored) to %s", _fmt(manifest["class"]), len(tensors), len(blobs), folder)
    return folder


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise InputError(f"'{folder}' is not a folder: otofx.load reads the folder written by otofx.save")
    for fname in (MANIFEST, WEIGHTS):
        if not (folder / fname).is_file():
            raise InputError(f"'{folder}' has no {fname}: it is not a complete otofx.save folder")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"'{folder / MANIFEST}' is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"'{folder / MANIFEST}' was not written by otofx.save")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"'{folder}' has format version {version!r} (otofx {manifest.get('otofx_version')}); "
                         f"this otofx reads up to {FORMAT_VERSION}: upgrade otofx")
    _check_manifest(folder / MANIFEST, manifest)
    return manifest


def _check_manifest(where: Path, manifest: dict) -> None:
    """The manifest has the shape ``save`` writes (so a damaged one is an InputError, not a KeyError)."""

    def bad(what):
        raise InputError(f"'{where}' is damaged: {what}")

    def name_pair(v):
        return isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)

    if not name_pair(manifest.get("class")):
        bad("no model class")
    if not isinstance(manifest.get("modules"), list) or not isinstance(manifest.get("tensors"), list):
        bad("no module or tensor list")
    for e in manifest["modules"]:
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and name_pair(e.get("type"))
                and isinstance(e.get("attrs"), dict) and isinstance(e.get("init", {}), dict)):
            bad(f"module entry {str(e)[:80]}")
        for key in e["attrs"]:
            if not key.isidentifier() or key.startswith("__"):  # NB: no __class__ / __dict__ via setattr
                bad(f"attribute name {key!r} of module '{e['path']}'")
    for t in manifest["tensors"]:
        ok = (isinstance(t, dict) and t.get("kind") in ("parameter", "buffer", "tensor")
              and all(isinstance(t.get(k), str) for k in ("name", "module", "attr")))
        if ok and not t.get("none"):
            ok = (isinstance(t.get("shape"), list) and all(isinstance(n, int) for n in t["shape"])
                  and (t["kind"] != "parameter" or isinstance(t.get("requires_grad"), bool)))
        if ok and t["kind"] == "buffer":
            ok = isinstance(t.get("persistent"), bool)
        if not ok or not t["attr"].isidentifier() or t["attr"].startswith("__"):
            bad(f"tensor entry {str(t)[:80]}")
    stored = set()
    for t in manifest["tensors"]:
        if "same_as" in t and t["same_as"] not in stored:
            bad(f"tensor '{t['name']}' is the same as '{t['same_as']}', which is not stored before it")
        if not t.get("none"):
            stored.add(t["name"])


def _check_weights(folder: Path, manifest: dict) -> None:
    """The safetensors file holds exactly the stored tensors, with the recorded shapes."""
    from safetensors import safe_open

    want = {t["name"]: t["shape"] for t in manifest["tensors"] if "shape" in t and "same_as" not in t}
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt", device="cpu") as f:
            have = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise InputError(f"'{folder / WEIGHTS}' cannot be read as safetensors ({e})") from None
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise InputError(f"'{folder / WEIGHTS}' does not match {MANIFEST}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, shape in want.items():
        if have[name] != shape:
            raise InputError(f"tensor '{name}' has shape {have[name]} in {WEIGHTS} but {shape} in {MANIFEST}")


def _build_hf(folder: Path, manifest: dict) -> nn.Module:
    """A Hugging Face model built from the saved config on the meta device."""
    cls_name = manifest["class"]
    hf = manifest.get("huggingface")
    if not hf:
        raise InputError(
            f"'{folder}' holds a {_fmt(cls_name)}, not a Hugging Face model: pass a freshly built dense instance "
            f"as otofx.load(path, model=...) (it is resized in place; building it on the meta device avoids "
            f"allocating the dense weights)")
    cfg_path = folder / hf.get("config", HF_CONFIG)
    if not cfg_path.is_file():
        raise InputError(f"'{folder}' has no {cfg_path.name}: a Hugging Face model is rebuilt from its config")
    try:
        import transformers
    except ImportError:
        raise InputError(f"'{folder}' holds a Hugging Face {cls_name[1]}: loading it needs `pip install transformers`"
                         ) from None
    cfg = json.loads(cfg_path.read_text())
    names = [cls_name[1]] if cls_name[0].startswith("transformers.") else []
    names += [n for n in cfg.get("architectures") or [] if n not in names]
    cls = None
    for n in names:
        try:
            cand = getattr(transformers, n)
        except (AttributeError, ImportError):
            continue
        if isinstance(cand, type) and issubclass(cand, transformers.PreTrainedModel):
            cls = cand
            break
    if cls is None:
        raise InputError(f"'{folder}' holds a {_fmt(cls_name)}, which transformers does not provide: pass a "
                         f"freshly built instance as otofx.load(path, model=...)")
    # NB: transformers writes inf/nan as {"__float__": "Infinity"} (Mamba 2's time_step_limit); its
    # own reader decodes them, from_dict alone does not
    decode = getattr(cls.config_class, "_decode_special_floats", None)
    config = cls.config_class.from_dict(decode(cfg) if callable(decode) else cfg)
    if hf.get("attn_implementation"):
        config._attn_implementation = hf["attn_implementation"]
    if hf.get("experts_implementation"):
        config._experts_implementation = hf["experts_implementation"]
    with torch.device("meta"):
        return cls(config)


def _experts_implementation(config) -> str | None:
    """The mixture-of-experts kernel a Hugging Face config runs (``batched_mm``, ``grouped_mm`` ...), or None."""
    try:
        value = getattr(config, "_experts_implementation", None)
    except Exception:  # noqa: BLE001 - a config class without the property
        return None
    return value if isinstance(value, str) else None


class _Plan:
    """What load will do to the target model, worked out (and checked) before anything changes."""

    def __init__(self, model: nn.Module, manifest: dict):
        self.model = model
        self.replaced: dict[str, nn.Module] = {}
        rebuild = _rebuildable()
        for entry in manifest["modules"]:
            path, saved = entry["path"], tuple(entry["type"])
            mod = self.module(path, saved)
            if _type_name(type(mod)) != saved:
                if saved not in rebuild or "init" not in entry:
                    raise InputError(f"module '{path or '(root)'}' is a {_fmt(_type_name(type(mod)))} in the given "
                                     f"model but a {_fmt(saved)} in the saved one: the model was not built like the "
                                     f"saved model's dense original")
                init = {k: _decode(v) for k, v in entry["init"].items()}
                try:
                    self.replaced[path] = rebuild[saved].empty(**init, device="meta")
                except (TypeError, ValueError, RuntimeError) as e:
                    raise InputError(f"module '{path}' ({saved[1]}) cannot be rebuilt from its saved arguments "
                                     f"{init}: {e}") from None
            mod = self.module(path, saved)
            for key, fields in entry.get("records", {}).items():
                rec = vars(mod).get(key)
                if not is_record(rec):
                    raise InputError(f"'{key}' of module '{path or '(root)'}' is a settings record in the saved "
                                     f"model but {type(rec).__name__} in the given one: the model was not built like "
                                     "the saved model's dense original")
                missing = [f for f in fields if not hasattr(rec, f)]
                if missing:
                    raise InputError(f"the record '{key}' of module '{path or '(root)'}' has no field "
                                     f"{missing[0]!r} in the given model: it was not built like the saved model's "
                                     "dense original")
            for key in entry["attrs"]:
                if key in mod._parameters or key in mod._buffers or key in mod._modules:
                    raise InputError(f"'{key}' of module '{path or '(root)'}' is a simple attribute in the saved model "
                                     f"but a parameter, buffer or submodule in the given one")
        names = set()
        for rec in manifest["tensors"]:
            names.add(rec["name"])
            mod = self.module(rec["module"], None)
            where = f"module '{rec['module'] or '(root)'}' ({type(mod).__name__})"
            kind, attr = rec["kind"], rec["attr"]
            own = {"parameter": mod._parameters, "buffer": mod._buffers}.get(kind)
            others = [d for k, d in (("parameter", mod._parameters), ("buffer", mod._buffers),
                                     ("submodule", mod._modules)) if k != kind]
            if any(attr in d for d in others):
                raise InputError(f"'{rec['name']}' is a {kind} in the saved model but not in the given one ({where})")
            if own is not None and attr not in own:
                raise InputError(f"{where} of the given model has no {kind} '{attr}' (saved shape "
                                 f"{rec.get('shape')}): the model was not built like the saved model's dense original")
            cur = own.get(attr) if own is not None else getattr(mod, attr, None)
            if isinstance(cur, torch.Tensor) and "shape" in rec and cur.dim() != len(rec["shape"]):
                raise InputError(f"{kind} '{rec['name']}' has {cur.dim()} dimensions in the given model "
                                 f"({list(cur.shape)}) but the saved one has shape {rec['shape']}: {where} "
                                 "cannot take it")
        for path, mod in self.walk():
            for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                name = f"{path}.{attr}" if path else attr
                if t is not None and name not in names:
                    raise InputError(f"'{name}' of the given model has no saved value: the model has a tensor the "
                                     f"saved one does not (built with a different configuration?)")
            for attr, t in vars(mod).items():
                name = f"{path}.{attr}" if path else attr
                if isinstance(t, torch.Tensor) and t.device.type == "meta" and name not in names:
                    raise InputError(f"tensor attribute '{name}' is on the meta device and was not saved: build the "
                                     f"model on a real device")

    def module(self, path: str, saved_type) -> nn.Module:
        if path in self.replaced:
            return self.replaced[path]
        if not path:
            return self.model
        parent_path, _, name = path.rpartition(".")
        parent = self.module(parent_path, None)
        if name not in parent._modules or parent._modules[name] is None:
            what = f" (a {_fmt(saved_type)})" if saved_type else ""
            raise InputError(f"the given model has no submodule '{path}'{what} that the saved model has: it was not "
                             f"built like the saved model's dense original")
        return parent._modules[name]

    def walk(self, mod: nn.Module | None = None, path: str = ""):
        mod = self.replaced.get(path, self.model if mod is None else mod)
        yield path, mod
        for name, child in mod._modules.items():
            if child is not None:
                yield from self.walk(child, f"{path}.{name}" if path else name)


def load(path, model: nn.Module | None = None, *, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save` in the folder ``path``.

    * A Hugging Face model is built from the saved config on the meta device, then given the saved
      tensors: ``model`` may be left out.
    * Any other model needs ``model``: a freshly built dense instance of the saved class (on any device,
      the meta device included). It is **resized in place** and returned: narrower layers get their
      saved attributes and tensors, replaced modules are rebuilt.
    * ``device`` (default: the CPU) places every tensor; ``dtype`` casts the floating-point ones.

    Everything is checked before ``model`` changes; errors are :class:`otofx.InputError`.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    manifest = _read_manifest(folder)
    _check_weights(folder, manifest)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    saved_cls = tuple(manifest["class"])
    if model is None:
        model = _build_hf(folder, manifest)
    elif not isinstance(model, nn.Module):
        raise InputError(f"model= must be a torch.nn.Module (a freshly built {_fmt(saved_cls)}), "
                         f"got {type(model).__name__}")
    elif _type_name(type(model)) != saved_cls:
        raise InputError(f"'{folder}' holds a {_fmt(saved_cls)} but model= is a {_fmt(_type_name(type(model)))}: "
                         f"pass a freshly built {saved_cls[1]}")
    plan = _Plan(model, manifest)
    data = load_file(str(folder / WEIGHTS), device="cpu")
    if device is not None or dtype is not None:
        try:
            for k, v in data.items():  # one tensor at a time: at most one extra copy alive
                data[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        except (RuntimeError, AssertionError) as e:  # an unknown or unavailable device
            raise InputError(f"cannot place the saved tensors on device={device!r}: {e}") from None
    # -- from here on the model changes ----------------------------------------------------------
    for p in plan.replaced:  # parents first (the manifest lists modules in pre-order)
        parent_path, _, name = p.rpartition(".")
        plan.module(parent_path, None)._modules[name] = plan.replaced[p]
    for entry in manifest["modules"]:
        mod = plan.module(entry["path"], None)
        for key, value in entry["attrs"].items():
            value = _decode(value)
            if key not in vars(mod) or not _same(getattr(mod, key), value):
                setattr(mod, key, value)
        for key, fields in entry.get("records", {}).items():
            # NB: a record the module shares with others (litgpt's one Config) is copied for it when
            # its saved fields differ (a block with fewer heads), as compress() left it
            rec = vars(mod)[key]
            diff = {f: _decode(v) for f, v in fields.items() if not _same(getattr(rec, f), _decode(v))}
            if diff:
                rec = copy.copy(rec)
                for f, v in diff.items():
                    object.__setattr__(rec, f, v)
                mod.__dict__[key] = rec
    objects: dict[str, torch.Tensor] = {}
    for rec in manifest["tensors"]:
        mod = plan.module(rec["module"], None)
        kind, attr = rec["kind"], rec["attr"]
        if rec.get("none"):
            t = None
        elif "same_as" in rec:
            t = objects[rec["same_as"]]
        else:
            t = data[rec["name"]]
            if kind == "parameter":
                t = nn.Parameter(t, requires_grad=rec["requires_grad"] and t.is_floating_point())
        if t is not None:
            objects[rec["name"]] = t
        if kind == "parameter":
            mod._parameters[attr] = t
        elif kind == "buffer":
            mod._buffers[attr] = t
            fxcompat.set_buffer_persistent(mod, attr, rec["persistent"])
        else:
            mod.__dict__[attr] = t
    from otofx.passes.modules import refresh_rnn_weights

    refresh_rnn_weights(model)  # NB: a stock LSTM reads its weights through a list the slots above bypass
    log.info("loaded %s from %s (%d tensors)", _fmt(saved_cls), folder, len(data))
    return model


__all__ = ["save", "load"]
