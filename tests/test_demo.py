"""``otofx demo`` and its machinery (``otofx/demo.py``), on tiny step budgets.

One module-scoped DHSPG run (a narrow DigitsNet, 30 steps, a strong group lasso so that rows really
reach zero) backs most checks. The CLI is checked twice: its argument wiring with ``run_demo``
swapped for a recorder, and once for real, end to end, on a 3-step budget.
"""
from __future__ import annotations

import dataclasses
import logging
import pytest
import torch

pytest.importorskip("sklearn")

from otofx import cli  # noqa: E402
from otofx import demo  # noqa: E402
from otofx.errors import InputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = demo.DemoConfig(epochs=2, max_steps=30, widths=(8, 8, 16, 16), lr=0.1, lmbda=1.0, epsilon=0.95,
                       target_group_sparsity=0.5, latency_runs=3)


@pytest.fixture(scope="module")
def data():
    return demo.load_digits_split(16)


@pytest.fixture(scope="module")
def result(data):
    return demo.run_demo(TINY, data)


class _Records(logging.Handler):
    """Collects the records of one logger, whatever pytest's logging plugin does."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


def test_split_is_fixed_stratified_and_standardised(data):
    again = demo.load_digits_split(16)
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    assert data.x_train.shape[1:] == (1, 16, 16) and data.x_test.shape[1:] == (1, 16, 16)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert len(data.y_test) == 360
    counts = torch.bincount(data.y_test, minlength=10)  # stratified: 36 (+-1) test images per class
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    other = demo.load_digits_split(16, split_seed=1)
    assert not torch.equal(data.y_test, other.y_test)


def test_step_budget_and_epoch_records(result):
    spe = TINY.steps_per_epoch(1437)
    assert spe == 1437 // 64
    assert [r.step for r in result.dhspg_history] == [spe, 30]
    assert [r.step for r in result.dense_history] == [spe, 30]
    for r in result.dhspg_history:
        assert r.group_sparsity is not None and 0.0 <= r.group_sparsity <= 1.0
        assert 0.0 <= r.test_acc <= 1.0 and 0.0 <= r.train_acc <= 1.0 and r.loss > 0
    assert all(r.group_sparsity is None for r in result.dense_history)
    # the records carry the scheduled lr (for the next step): cosine down to 0 at the end of the budget
    for r in result.dhspg_history + result.dense_history:
        assert r.lr == pytest.approx(TINY.lr * demo.lr_factor(r.step, 30, TINY.decay_from), abs=1e-12)
    assert result.dhspg_history[-1].lr == pytest.approx(0.0, abs=1e-12)


def test_table_rows(result):
    names = [r["model"] for r in result.rows]
    assert names == ["dense (SGD)", "DHSPG, full", "DHSPG, compressed"]
    assert all(set(r) == set(demo.ROW_KEYS) for r in result.rows)
    dense, full, small = result.rows
    assert dense["params"] == full["params"] and dense["FLOPs"] == full["FLOPs"]
    assert full["group sparsity"] == result.dhspg_history[-1].group_sparsity
    # rows really were zeroed and removed, so the equality checks are not vacuous
    assert full["group sparsity"] >= TINY.target_group_sparsity
    assert small["params"] < full["params"] and small["FLOPs"] < full["FLOPs"]
    assert small["test acc"] == full["test acc"]
    assert all(r["latency ms"] > 0 for r in result.rows)


def test_compressed_equals_trained_on_the_test_set(result, data):
    assert type(result.compressed) is type(result.trained)  # compress() gives back the model's class
    ref = demo.logits(result.trained, data.x_test)
    got = demo.logits(result.compressed, data.x_test)
    assert float((ref - got).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    assert torch.equal(ref.argmax(1), got.argmax(1))
    assert result.same_predictions and result.max_test_diff == float((ref - got).abs().max())
    # the check is not vacuous: BN statistics were trained, and the DHSPG model is not the dense one
    bn = [m for m in result.trained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bn)
    assert not torch.equal(demo.logits(result.dense, data.x_test), ref)


def test_run_demo_is_deterministic(data):
    cfg = demo.DemoConfig(max_steps=12, widths=(4, 4, 8, 8), lmbda=1.0, epsilon=0.95, target_group_sparsity=0.5,
                          latency_runs=1)

    def once(global_seed):
        torch.manual_seed(global_seed)  # the demo seeds itself: the global RNG state must not matter
        r = demo.run_demo(cfg, data)
        return r, demo.logits(r.compressed, data.x_test)

    (a, la), (b, lb) = once(123), once(456)
    for ha, hb in ((a.dense_history, b.dense_history), (a.dhspg_history, b.dhspg_history)):
        assert [(r.loss, r.train_acc, r.test_acc, r.group_sparsity) for r in ha] == \
               [(r.loss, r.train_acc, r.test_acc, r.group_sparsity) for r in hb]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "latency ms"} for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)
    assert torch.equal(la, lb)
    # and another seed gives another run
    c = demo.run_demo(dataclasses.replace(cfg, seed=1), data)
    assert [r.loss for r in c.dense_history] != [r.loss for r in a.dense_history]


def test_train_logs_progress_per_epoch(data):
    torch.manual_seed(0)
    model = demo.DigitsNet((4, 4, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with _Records("otofx.demo") as rec:
        hist = demo.train(model, opt, data, steps=6, steps_per_epoch=4, batch_size=32, seed=3, name="probe")
    assert [r.step for r in hist] == [4, 6]
    lines = [m for m in rec.messages if m.startswith("probe epoch")]
    assert len(lines) == 2 and "loss" in lines[0] and "test acc" in lines[0]


def test_lr_factor_shape():
    assert demo.lr_factor(0, 100) == 1.0 and demo.lr_factor(59, 100) == 1.0
    vals = [demo.lr_factor(s, 100) for s in range(60, 101)]
    assert vals[0] == 1.0 and vals[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(max_steps=0), dict(target_group_sparsity=1.0),
                                 dict(widths=()), dict(lr=0.0), dict(decay_from=1.5)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        demo.DemoConfig(**bad)


def test_cli_demo_wiring(result, monkeypatch, capsys):
    seen = {}

    def fake(config):
        seen["config"] = config
        return result

    monkeypatch.setattr(demo, "run_demo", fake)
    rc = cli.main(["demo", "--epochs", "7", "--max-steps", "11", "--seed", "4", "--target", "0.6",
                   "--latency-runs", "9", "--quiet"])
    assert rc == 0
    c = seen["config"]
    assert (c.epochs, c.max_steps, c.seed, c.target_group_sparsity, c.latency_runs) == (7, 11, 4, 0.6, 9)
    assert c.widths == demo.DemoConfig().widths  # everything else: the README run's defaults
    out = capsys.readouterr().out
    for name in ("dense (SGD)", "DHSPG, full", "DHSPG, compressed", "test acc", "MFLOPs", "latency ms"):
        assert name in out
    assert f"{100 * result.rows[2]['test acc']:.2f}%" in out
    assert f"{result.rows[2]['params']:,}" in out
    assert "same predictions: True" in out


class _Stop(Exception):
    pass


def test_cli_demo_defaults_are_the_readme_run(monkeypatch):
    seen = {}

    def fake(config):
        seen["config"] = config
        raise _Stop  # only the config matters here

    monkeypatch.setattr(demo, "run_demo", fake)
    with pytest.raises(_Stop):
        cli.main(["demo", "--quiet"])
    assert seen["config"] == demo.DemoConfig()


def test_cli_demo_bad_argument_is_a_clean_error(capsys):
    assert cli.main(["demo", "--epochs", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "otofx: error:" in err and "epochs=0" in err


def test_cli_demo_end_to_end_on_a_tiny_budget(capsys):
    # the real command path (default model, real training, compress, table) on 3 steps per model
    progress = logging.getLogger("otofx.demo")
    rec = _Records("otofx.demo")
    progress.addHandler(rec)  # no level set here: the CLI itself must turn the progress lines on
    try:
        assert progress.getEffectiveLevel() > logging.INFO
        assert cli.main(["demo", "--max-steps", "3", "--latency-runs", "2"]) == 0
    finally:
        progress.removeHandler(rec)
    out = capsys.readouterr().out
    assert "DHSPG, compressed" in out and "same predictions: True" in out
    assert any(m.startswith("dhspg epoch  1 (step    3)") for m in rec.messages)
    assert any(m.startswith("dense epoch  1 (step    3)") for m in rec.messages)
    assert progress.level == logging.NOTSET  # and restored it


def test_cli_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--max-steps" in out and "digits" in out and "--quiet" in out
