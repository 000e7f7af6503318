"""EMA weights (train.ema): the average follows e_t = d * e_(t-1) + (1 - d) * p_t from the initial params,
leaves training itself unchanged, is saved and continued exactly across a resume, starts from the params
when turned on at a resume and is dropped when turned off, and is what evaluation and `restore_params` read.

Each test compares numbers with a hand computation from the raw params of every step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.cli import main
from loopformer.data.sources import build_data
from loopformer.errors import AnalysisError, ConfigError
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.evaluation.run import load_run
from loopformer.model.plan import resolve_loops
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.layout import RunDir
from loopformer.runs.read import read_run
from loopformer.runs.restore import EMA_WEIGHTS, ONLY_WEIGHTS, RAW_WEIGHTS, make_model, restore_params
from loopformer.train import trainer
from loopformer.train.optim import make_optimizer
from loopformer.train.step import StepSettings, init_state, make_train_step
from loopformer.train.trainer import train
from tests.conftest import copy_run, tiny_config, train_until_crash, trained_config

DECAY = 0.9
# trained_run's settings with EMA weights and a checkpoint at every step (the raw params of each step)
EMA_RUN = [f"train.ema={DECAY}", "train.checkpoint_every=1", "train.keep_checkpoints=5"]


def host(tree):
    """A copy on the host in float64 (the train step donates its state)."""
    return jax.tree.map(lambda x: np.array(x, np.float64), tree)


def average(initial, steps, decay=DECAY):
    """e_0 = initial, e_t = decay * e_(t-1) + (1 - decay) * p_t, in float64."""
    e = initial
    for p in steps:
        e = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, e, p)
    return e


def assert_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6, atol=atol)


def assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def three_steps(cfg):
    """(initial params, [(state after each step, on the host)], [metrics]) of 3 train steps of ``cfg``."""
    source = build_data(cfg)
    graphdef, params = nnx.split(make_model(cfg, source))
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.train)
    step = make_train_step(graphdef, tx, StepSettings.of(cfg))
    initial = host(params)
    state = init_state(jax.tree.map(jnp.asarray, params), tx, ema=cfg.train.ema > 0)
    batches = source.train_iterator(cfg.data.batch_size, cfg.seed)
    states, metrics = [], []
    for _ in range(3):
        state, m = step(state, next(batches))
        states.append({k: host(v) for k, v in state.items() if k != "opt_state"})
        metrics.append({k: float(v) for k, v in m.items()})
    return initial, states, metrics


def test_the_average_follows_the_params_of_every_step(tmp_path):
    """After each of 3 steps, state["ema"] = d * ema + (1 - d) * params (from the initial params), and
    the average is not the params (the test is not vacuous)."""
    initial, states, _ = three_steps(tiny_config(tmp_path, "ema", f"train.ema={DECAY}"))
    e = initial
    for s in states:
        e = average(e, [s["params"]])
        assert_close(s["ema"], e)
    assert max_diff(states[-1]["ema"], states[-1]["params"]) > 1e-3


def test_ema_off_keeps_no_average_and_trains_exactly_as_with_it(tmp_path):
    """train.ema=0: the state is {params, opt_state, step}; the params and metrics of every step are
    bit-identical to a run keeping the average (which only reads the params)."""
    _, off, m_off = three_steps(tiny_config(tmp_path, "plain"))
    _, on, m_on = three_steps(tiny_config(tmp_path, "averaged", f"train.ema={DECAY}"))
    assert [set(s) for s in off] == [{"params", "step"}] * 3 and all("ema" in s for s in on)
    assert init_state({"w": jnp.ones(2)}, make_optimizer(tiny_config(tmp_path, "plain").train)).keys() == {
        "params", "opt_state", "step"}
    for a, b in zip(off, on, strict=True):
        assert_equal(a["params"], b["params"])
    assert m_off == m_on


@pytest.mark.slow  # fast-suite margin under 8 minutes; CI runs it with the slow tests
def test_a_resumed_run_continues_the_average_exactly(tmp_path, monkeypatch, capsys, trained_run):
    """Train 2 steps, crash, resume to 4 == train 4 in one go (EMA and params); the average is the hand
    computation from the raw params of every checkpoint; training is bit-identical to `trained_run` (no EMA),
    and the evaluation read the EMA weights (logged, and equal to evaluating them here)."""
    straight = train(trained_config(tmp_path, "a", *EMA_RUN))
    assert "eval @ 4 (EMA weights): " in capsys.readouterr().out
    train_until_crash(trained_config(tmp_path, "b", *EMA_RUN), 2, monkeypatch)
    resumed = train(trained_config(tmp_path, "b", *EMA_RUN))
    cfg_a, cfg_b = trained_config(tmp_path, "a", *EMA_RUN), trained_config(tmp_path, "b", *EMA_RUN)
    for step in (3, 4):
        assert_close(restore_params(cfg_a, step)[1], restore_params(cfg_b, step)[1])
        assert_close(restore_params(cfg_a, step, raw=True)[1], restore_params(cfg_b, step, raw=True)[1])

    initial = host(nnx.to_pure_dict(nnx.state(make_model(cfg_a, build_data(cfg_a)))))
    raw = [host(restore_params(cfg_a, s, raw=True)[1]) for s in range(1, 5)]
    _, ema, step = restore_params(cfg_a)
    assert step == 4
    assert_close(ema, average(initial, raw))
    assert max_diff(ema, raw[-1]) > 1e-3
    assert_equal(restore_params(trained_config(trained_run.run_dir.parent))[1], restore_params(cfg_a, raw=True)[1])

    assert straight.eval == resumed.eval != trained_run.eval
    source = build_data(cfg_a)
    model = make_model(cfg_a, source)
    mine = trainer.evaluate_all(evaluator_for(model), ema, source.eval_sets(),
                                resolve_loops({c.name: c.eval_loops for c in cfg_a.model.circuits()}))
    for split, m in straight.eval.items():
        assert m["loss"] == pytest.approx(mine[split]["loss"], rel=1e-5)


def test_restore_params_and_load_run_read_the_ema_weights(tmp_path, capsys, trained_run):
    """A run with EMA weights: restore_params and load_run (every analysis command) return exactly the
    checkpoint's "ema", and --raw-weights (raw=True) its "params"; a run without returns its params."""
    cfg = trained_config(tmp_path, "r", *EMA_RUN)
    train(cfg)
    model, params, step = restore_params(cfg)
    abstract = nnx.to_pure_dict(nnx.state(model))
    with Checkpoints(RunDir(cfg.run_dir).checkpoints, async_save=False) as ckpts:
        assert ckpts.saved_parts() == {"params", "opt_state", "step", "ema"}
        saved = ckpts.restore({"ema": abstract, "params": abstract}, step=step, partial=True)
    assert_equal(params, saved["ema"])
    assert_equal(restore_params(cfg, raw=True)[1], saved["params"])
    assert max_diff(saved["ema"], saved["params"]) > 1e-3
    run = load_run(read_run(cfg.run_dir))
    assert run.weights == EMA_WEIGHTS
    assert_equal(run.params, saved["ema"])
    assert_equal(load_run(read_run(cfg.run_dir), raw=True).params, saved["params"])
    with Checkpoints(RunDir(trained_run.run_dir).checkpoints, async_save=False) as ckpts:
        assert "ema" not in ckpts.saved_parts()  # a run written without EMA (or before it existed)
    assert load_run(read_run(trained_run.run_dir)).weights == ONLY_WEIGHTS
    with pytest.raises(AnalysisError, match="--raw-weights: .* keeps no EMA weights at step 4 .*; drop --raw-weights"):
        load_run(read_run(trained_run.run_dir), raw=True)  # it would be accepted and change nothing
    # every --json document says which weights it read (the EMA and raw documents were alike; issue 27 pass 10)
    for flags, weights in (([], EMA_WEIGHTS), (["--raw-weights"], RAW_WEIGHTS)):
        capsys.readouterr()
        assert main(["eval", "--run", str(cfg.run_dir), "--examples", "4", "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["weights"] == weights


@pytest.mark.slow  # fast-suite margin under 8 minutes; CI runs it with the slow tests
def test_turning_ema_on_and_off_at_a_resume(tmp_path, capsys, trained_run):
    """A run without EMA weights resumed with train.ema starts the average from its params (logged and
    recorded in config_changes.jsonl); resumed again with train.ema=0 the average is dropped (logged)."""
    copy_run(trained_run, tmp_path, "toggled")
    cfg = trained_config(tmp_path, "toggled", "train.steps=6", f"train.ema={DECAY}", "train.checkpoint_every=1")
    train(cfg)
    out = capsys.readouterr().out
    assert f"  train.ema: 0.0 -> {DECAY} from step 4" in out
    assert "  train.ema: checkpoint step 4 has no EMA weights; their average starts from its params" in out
    raw = [host(restore_params(cfg, s, raw=True)[1]) for s in (4, 5, 6)]
    assert_close(restore_params(cfg)[1], average(raw[0], raw[1:]))
    records = [json.loads(line) for line in RunDir(cfg.run_dir).changes.read_text().splitlines()]
    assert {"path": "train.ema", "old": 0.0, "new": DECAY, "part": "setting"} in records[-1]["changes"]

    off = trained_config(tmp_path, "toggled", "train.steps=7", "train.checkpoint_every=1")
    train(off)
    out = capsys.readouterr().out
    assert "  train.ema: the EMA weights of checkpoint step 6 are dropped; evaluation uses the params" in out
    assert "(EMA weights)" not in out
    with Checkpoints(RunDir(off.run_dir).checkpoints, async_save=False) as ckpts:
        assert "ema" not in ckpts.saved_parts(7) and "ema" in ckpts.saved_parts(6)
    assert_equal(restore_params(off)[1], restore_params(off, raw=True)[1])


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_a_decay_outside_0_1_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^train\.ema .* must be in \(0, 1\), e\.g\. train\.ema=0\.999, or 0 to "
                                          r"turn it off; got ") as e:
        tiny_config(tmp_path, "bad", f"train.ema={value}")
    assert len(str(e.value).splitlines()) == 1
