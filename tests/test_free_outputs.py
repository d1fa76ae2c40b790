"""Free outputs (``otofx.OTO(model, x, free_outputs=...)``): an output whose channels are zero with
their rows comes back narrower instead of pinning them.

By default a Hugging Face encoder-decoder's ``encoder_last_hidden_state`` is free, so its hidden
width (the residual stream, shared by encoder and decoder) is a group: T5 and BART compress to their
own class, exact on the logits, the encoder states equal to the zeroed model's on the kept channels,
``generate`` unchanged, and otofx.save / otofx.load give the same model back. ``free_outputs=()``
keeps the old pin. A plain model's dict (or tuple) output frees the keys (indices) it is given, in
both forms; an output whose channels are not zero with their rows stays pinned.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from helpers import n_params, randomize, zero_random_rows

import otofx
from otofx.errors import InputError

transformers = pytest.importorskip("transformers")

D = 32  # the tiny models' hidden width


def _seq2seq(family: str):
    """A tiny encoder-decoder with random weights, and its example input."""
    torch.manual_seed(0)
    if family == "t5":
        cfg = transformers.T5Config(vocab_size=64, d_model=D, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0, use_cache=False)
        m = transformers.T5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.BartConfig(vocab_size=64, d_model=D, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False)
        m = transformers.BartForConditionalGeneration(cfg)
    m = randomize(m.eval(), 0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "decoder_input_ids": torch.randint(3, 64, (2, 6), generator=g)}
    return m, x


def _stream_groups(oto, model) -> list:
    """The groups holding the token embedding's columns (the hidden width)."""
    table = model.get_input_embeddings().weight
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is table}
    return [z for z in oto.groups if any(n in names and d == 1 for n, d, _ in z.params)]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_hidden_width_is_free_and_compresses_exactly(family, tmp_path, caplog):
    model, x = _seq2seq(family)
    oto = otofx.OTO(model, x)
    assert [f.key for f in oto.free_outputs] == ["encoder_last_hidden_state"]
    stream = _stream_groups(oto, model)
    assert len(stream) == 1 and stream[0].rows == D
    assert "free outputs" in oto.report() and "encoder_last_hidden_state" in oto.report()
    zero_random_rows(model, oto)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress()
    assert type(small) is type(model) and n_params(small) < n_params(model)
    assert small.get_input_embeddings().weight.shape == (64, D // 2)
    assert f"'encoder_last_hidden_state' with {D // 2} of its {D} channels" in caplog.text
    assert "free_outputs=()" in caplog.text
    with torch.no_grad():
        ref, got = model(**x), small(**x)
    assert ref.logits.abs().max() > 0
    assert (got.logits - ref.logits).abs().max() <= 1e-4 * max(1.0, ref.logits.abs().max().item())
    # the encoder states: the zeroed model's kept channels, and zeros in the removed ones
    enc = ref.encoder_last_hidden_state
    alive = enc.abs().amax((0, 1)) > 0
    assert int(alive.sum()) == D // 2 and got.encoder_last_hidden_state.shape[-1] == D // 2
    assert torch.allclose(got.encoder_last_hidden_state, enc[..., alive], atol=1e-5, rtol=1e-4)
    assert oto.verify(small) <= 1e-4
    ids, mask = x["input_ids"], x["attention_mask"]
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
                       small.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    loaded = otofx.load(otofx.save(small, tmp_path / family))
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, got.logits)


def test_encoder_decoder_graph_form_narrows_the_encoder_states():
    model, x = _seq2seq("t5")
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto)
    small = oto.compress(form="graph")
    assert isinstance(small, torch.fx.GraphModule)
    with torch.no_grad():
        ref, got = model(**x), small(**x)
    assert got.encoder_last_hidden_state.shape[-1] == D // 2
    assert (got.logits - ref.logits).abs().max() <= 1e-4 * max(1.0, ref.logits.abs().max().item())
    assert oto.verify(small) <= 1e-4


def test_free_outputs_empty_keeps_every_output_width():
    model, x = _seq2seq("t5")
    oto = otofx.OTO(model, x, free_outputs=())
    assert oto.free_outputs == () and not _stream_groups(oto, model)
    assert any(p.reason == "model output" for p in oto.pinned)
    zero_random_rows(model, oto)
    small = oto.compress()
    with torch.no_grad():
        assert small(**x).encoder_last_hidden_state.shape[-1] == D


class _Encoder(nn.Module):
    """A plain model returning its hidden state beside its logits (a dict, or a tuple)."""

    def __init__(self, as_tuple: bool = False, shift: float = 0.0):
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.as_tuple, self.shift = as_tuple, shift

    def forward(self, x):
        h = torch.relu(self.enc(x))
        logits = self.head(h)
        hidden = h + self.shift if self.shift else h
        return (logits, hidden) if self.as_tuple else {"logits": logits, "hidden": hidden}


def _hidden_groups(oto) -> list:
    return [z for z in oto.groups if any(n == "enc.weight" and d == 0 for n, d, _ in z.params)]


@pytest.mark.parametrize("as_tuple", [False, True])
@pytest.mark.parametrize("form", ["module", "graph"])
def test_plain_model_output_named_free(as_tuple, form):
    model = randomize(_Encoder(as_tuple).eval(), 0)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    key = 1 if as_tuple else "hidden"
    assert not _hidden_groups(otofx.OTO(model, x))  # "auto" frees nothing of a plain model
    oto = otofx.OTO(model, x, free_outputs=(key,))
    assert [f.key for f in oto.free_outputs] == [key] and len(_hidden_groups(oto)) == 1
    zero_random_rows(model, oto)
    small = oto.compress(form=form)
    assert isinstance(small, torch.fx.GraphModule) == (form == "graph")
    with torch.no_grad():
        ref, got = model(x), small(x)
    ref_logits, ref_hidden = (ref[0], ref[1]) if as_tuple else (ref["logits"], ref["hidden"])
    got_logits, got_hidden = (got[0], got[1]) if as_tuple else (got["logits"], got["hidden"])
    assert torch.allclose(got_logits, ref_logits, atol=1e-6)
    alive = model.enc.weight.abs().amax(1) > 0
    assert got_hidden.shape == (5, 4) and torch.equal(got_hidden, ref_hidden[:, alive])
    assert oto.verify(small) <= 1e-6


def test_free_output_that_is_not_zero_with_its_rows_stays_pinned():
    model = randomize(_Encoder(shift=1.0).eval(), 0)  # hidden = h + 1: a removed channel would be 1, not 0
    oto = otofx.OTO(model, torch.randn(5, 6), free_outputs=("hidden",))
    assert not _hidden_groups(oto)
    assert any("free_outputs" in p.reason for p in oto.pinned)


def test_unknown_free_output_is_an_input_error():
    with pytest.raises(InputError, match="'logits', 'hidden'"):
        otofx.OTO(_Encoder().eval(), torch.randn(5, 6), free_outputs=("hiden",))


def test_pipeline_verifies_a_free_output_on_its_kept_channels():
    """The pipeline's runner (``verify=True``) and its ``Verify`` pass compare a pruned graph's free
    output with the reference's kept channels."""
    from otofx import pipeline

    model = randomize(_Encoder().eval(), 0)
    x = torch.randn(5, 6)
    zero_random_rows(model, otofx.OTO(model, x, free_outputs=("hidden",)))
    state = pipeline.Pipeline(pipeline.default().passes, verify=True).run(model, x, free_outputs=("hidden",))
    assert state.gm(x)["hidden"].shape == (5, 4)
    assert all(r.error is None or r.error <= 1e-6 for r in state.records)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_cli_analyze_frees_the_outputs_it_is_given(as_tuple, capsys):
    from otofx import cli

    spec, key = ("test_free_outputs:_tuple_encoder", "1") if as_tuple else ("test_free_outputs:_Encoder", "hidden")
    assert cli.main(["analyze", spec, "--input", "5,6", "--free-output", key]) == 0
    freed = capsys.readouterr().out
    assert cli.main(["analyze", spec, "--input", "5,6"]) == 0
    kept = capsys.readouterr().out
    assert "free output" in freed.lower() and "free output" not in kept.lower()
    assert cli.main(["analyze", spec, "--input", "5,6", "--free-output", "nope"]) != 0
    assert "nope" in capsys.readouterr().err


def _tuple_encoder():
    return _Encoder(as_tuple=True)
