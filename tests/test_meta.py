"""Analysis without weights: ``OTO(model_on_meta, x)`` finds the same groups as on real weights.

A LLaMA config built under ``torch.device("meta")`` holds no weight memory; analysis needs only
shapes. compress() (and plan/verify/row_norms) on a meta model raises a clear InputError; once the
model is materialised (``to_empty`` + loading weights), the same OTO compresses it exactly.
"""
from __future__ import annotations

import pytest
import torch

import otofx
from helpers import assert_exact, zero_random_rows

pytestmark = pytest.mark.usefixtures("single_thread")

transformers = pytest.importorskip("transformers")


def _config():
    return transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)


def _pair():
    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(_config()).eval()
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(_config()).eval()
    return real, meta


def _groups(oto):
    return [(z.rows, [(name, dim, tuple(idx.shape), idx.tolist()) for name, dim, idx in z.params]) for z in oto.groups]


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("ids_on", ["cpu", "meta"])
def test_meta_analysis_matches_real(ids_on):
    real, meta = _pair()
    ids = torch.randint(0, 100, (2, 16))
    ref = otofx.OTO(real, ids)
    got = otofx.OTO(meta, ids.to(ids_on))
    assert len(got.groups) == 5 and sum(z.rows for z in got.groups) > 0  # heads and MLP of 2 layers, the hidden width
    assert _groups(got) == _groups(ref)
    assert [(p.node, p.op, p.reason, p.channels) for p in got.pinned] == [(p.node, p.op, p.reason, p.channels) for p in ref.pinned]
    assert _shapes(meta) == _shapes(real)
    assert got.report() == ref.report()
    # no weight memory: nothing was materialised, in the model or in the captured graph
    assert all(t.is_meta for t in list(meta.parameters()) + list(got.graph_module.parameters()))


def test_compress_on_meta_raises_clearly():
    _, meta = _pair()
    oto = otofx.OTO(meta, torch.randint(0, 100, (2, 16)))
    for call in (oto.compress, lambda: oto.compress(verify=False), oto.plan, oto.row_norms):
        with pytest.raises(otofx.InputError, match=r"needs real weights.*meta device.*to_empty"):
            call()


def _materialise(meta, real):
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are not in the state_dict
        for (name, b), (_, rb) in zip(meta.named_buffers(), real.named_buffers()):
            b.copy_(rb)


def test_materialised_meta_model_compresses_exactly():
    real, meta = _pair()
    ids = torch.randint(0, 100, (2, 16))
    oto = otofx.OTO(meta, ids)
    (a2, _), = oto.state.more_inputs  # the second shape is verified too, on the user's real ids tiled
    assert a2[0].device.type == "cpu" and tuple(a2[0].shape) == (3, 17) and torch.equal(a2[0][:2, :16], ids)
    _materialise(meta, real)
    zero_random_rows(meta, oto, seed=3)
    assert_exact(meta, oto, ids, ref_kwargs={"use_cache": False})


def test_meta_inputs_need_verify_false():
    real, meta = _pair()
    ids = torch.randint(0, 100, (2, 16))
    oto = otofx.OTO(meta, ids.to("meta"))
    _materialise(meta, real)
    zero_random_rows(meta, oto, seed=3)
    with pytest.raises(otofx.InputError, match="example inputs.*meta device.*verify=False"):
        oto.compress()
    small = oto.compress(verify=False)
    assert_exact(meta, oto, ids, small=small, ref_kwargs={"use_cache": False})
