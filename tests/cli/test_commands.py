"""The analysis commands through `loopformer.cli.main`: JSON schemas, tables, files, user errors."""

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from loopformer.cli import main
from loopformer.evaluation.tables import sweep_table
from loopformer.runs.read import read_run
from loopformer.runs.scalars import read_tensorboard_scalars
from tests.conftest import EXAMPLES, ROOT, STEP, make_run, tiny_config

ROW_KEYS = {"split": str, "loops": dict, "ablated": list, "loss": float, "accuracy": float, "examples": int}


def run_json(capsys, *argv):
    assert main([*argv, "--examples", str(EXAMPLES), "--json"] if argv[0] != "generate" else [*argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON document on stdout


def check_rows(rows):
    for row in rows:
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row)
        assert set(row["loops"]) == {"X", "Y"} and row["examples"] == EXAMPLES


def test_eval(run_dir, capsys):
    doc = run_json(capsys, "eval", "--run", str(run_dir))
    check_rows(doc["rows"])
    assert doc["step"] == STEP
    assert [(r["split"], r["loops"], r["ablated"]) for r in doc["rows"]] == [
        ("train", {"X": 2, "Y": 3}, []), ("hard", {"X": 2, "Y": 3}, [])]
    doc = run_json(capsys, "eval", "--run", str(run_dir), "--loops", "X=1000", "--ablate", "Y", "--split", "hard")
    (row,) = doc["rows"]
    assert (row["split"], row["loops"], row["ablated"], row["mode"]) == ("hard", {"X": 1000, "Y": 3}, ["Y"], "zero")
    assert main(["eval", "--run", str(run_dir), "--examples", str(EXAMPLES), "--split", "hard"]) == 0
    table = capsys.readouterr().out
    assert "hard [4]" in table and "X=2 Y=3" in table and "train [1, 2]" not in table


def test_ablate(run_dir, capsys):
    doc = run_json(capsys, "ablate", "--run", str(run_dir), "--mode", "mean")
    check_rows(doc["rows"])
    assert [(r["split"], r["label"]) for r in doc["rows"]] == [
        (s, lab) for s in ("train", "hard") for lab in ("baseline", "-X", "-Y", "none")]
    assert all(r["mode"] == "mean" and "delta_accuracy" in r for r in doc["rows"])
    assert (run_dir / "ablation.csv").read_text().splitlines()[0].startswith("split,loops_X,loops_Y,ablated,loss")
    assert (run_dir / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep(run_dir, capsys):
    doc = run_json(capsys, "sweep", "--run", str(run_dir), "--loops", "X=1:4")
    check_rows(doc["rows"])
    assert doc["grid"] == {"X": [1, 2, 3, 4]} and doc["compiles"] <= 1  # 0 if an earlier test compiled it
    assert [(r["split"], r["loops"]["X"]) for r in doc["rows"]] == [(s, n) for s in ("train", "hard") for n in (1, 2, 3, 4)]
    # The sweep at the default counts is `eval`.
    evaluated = run_json(capsys, "eval", "--run", str(run_dir))["rows"]
    at_default = [r for r in doc["rows"] if r["loops"] == {"X": 2, "Y": 3}]
    assert at_default == evaluated
    # Convergence of the swept circuit, per split, up to the largest count swept.
    for split in ("train", "hard"):
        stats = doc["convergence"][split]["X"]
        assert {k: len(v) for k, v in stats.items()} == {"rel_change": 4, "state_norm": 4, "token_cosine": 4}
    assert {s["verdict"] for s in doc["convergence_summary"]} <= {"fixed-point", "settling", "drifting", "moving"}
    for name in ("sweep.csv", "sweep_X.png", "sweep_convergence.png"):
        assert str(run_dir / name) in doc["files"] and (run_dir / name).stat().st_size > 0
    # Tensorboard: its own run under sweeps/X, replaced (not appended to) by the next sweep of X.
    assert doc["tensorboard"] == str(run_dir / "sweeps" / "X")
    assert main(["sweep", "--run", str(run_dir), "--loops", "X=1:4", "--examples", str(EXAMPLES)]) == 0
    tb = read_tensorboard_scalars(run_dir / "sweeps" / "X")
    assert [step for step, _ in tb["sweep/hard/accuracy"]] == [1, 2, 3, 4]
    assert read_tensorboard_scalars(run_dir) == {}  # the run's own curves are untouched


def test_a_sweep_of_a_routed_stage_has_no_convergence_to_plot(tmp_path, capsys):
    """A routed bank keeps no per-iteration trace of its circuits: the sweep was a KeyError traceback."""
    run_dir = make_run(tiny_config(tmp_path, "routed", "model.stages.0.router={kind: expert_choice}",
                                   "model.stages.0.circuits.X.loops=fixed(3)"))
    doc = run_json(capsys, "sweep", "--run", str(run_dir), "--loops", "X=1:2")
    assert doc["convergence"] == {"train": {}, "hard": {}} and [r["loops"]["X"] for r in doc["rows"]] == [1, 2, 1, 2]
    assert not (run_dir / "sweep_convergence.png").exists() and (run_dir / "sweep_X.png").is_file()
    # a routed bank of two circuits is never compacted: --compact on / off would choose nothing
    assert main(["eval", "--run", str(run_dir), "--compact", "on"]) == 2
    # #27 pass 38: not "add --exit", which a routed stage refuses in turn
    assert capsys.readouterr().err.strip().endswith("none can: every circuit is in a routed stage, whose bank of several "
                                                     "circuits is never compacted (its router stops the tokens); drop "
                                                     "--compact")
    assert main(["sweep", "--run", str(run_dir), "--loops", "X=1:2", "--compact", "on"]) == 2
    assert "add --exit" not in capsys.readouterr().err


def test_eval_of_a_one_circuit_router_takes_compact(tmp_path, capsys):
    """#25: a one-circuit router stops tokens and evaluates compacted, so eval --compact on / off is a choice (it was
    refused: "none can stop"); the same numbers, the choice recorded."""
    x = "{name: X, depth: 1, width: 16, heads: 2, mlp_ratio: 1, loops: fixed(3)}"
    run_dir = make_run(tiny_config(tmp_path, "routed1", "model.stages.0.router={kind: token_choice}",
                                   f"model.stages.0.circuits=[{x}]"))
    on, off = (run_json(capsys, "eval", "--run", str(run_dir), "--split", "hard", "--compact", c) for c in ("on", "off"))
    assert (on["compact"], off["compact"]) == ("on", "off")
    assert on["rows"][0]["loss"] == pytest.approx(off["rows"][0]["loss"], rel=1e-5)
    assert on["rows"][0]["mean_loops"] == off["rows"][0]["mean_loops"]
    # #27 pass 17: generate refused it as "none can" stop, though its recomputed answers (--no-cache) run the same
    # forward pass, which compacts the bank; cached decoding never compacts a routed bank, and still refuses it
    gen = run_json(capsys, "generate", "--run", str(run_dir), "--no-cache", "--compact", "on", "--count", "1")
    assert gen["compact"] == "on"
    # #27 pass 38: cached decoding and a loop sweep said "none can: add --exit", and --exit is refused on a routed
    # stage; each names the fix that runs
    assert main(["generate", "--run", str(run_dir), "--compact", "on", "--count", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("cached decoding does not compact a routed stage (its router stops "
                                                     "tokens in a forward pass); add --no-cache (each prefix "
                                                     "recomputed, compacted), or drop --compact")
    assert main(["sweep", "--run", str(run_dir), "--loops", "X=1:2", "--compact", "on"]) == 2
    assert "takes --compact only with --exit; drop --compact (or evaluate one count with `loopformer eval --compact " \
        "on`)" in capsys.readouterr().err


def test_a_sweep_below_the_default_count_reports_nothing_at_it(run_dir, capsys):
    """#27 pass 13: swept to 1 loop (X's default is 2), Δ@default and norm@default were the last swept iteration's."""
    doc = run_json(capsys, "sweep", "--run", str(run_dir), "--loops", "X=1", "--split", "hard")
    (row,) = [r for r in doc["convergence_summary"] if r["circuit"] == "X"]
    assert row["iterations"] == 1 and row["rel_change_default"] is None and row["norm_default"] is None
    assert main(["sweep", "--run", str(run_dir), "--loops", "X=1", "--split", "hard", "--examples", str(EXAMPLES)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("hard") and " X " in x]
    assert line.split()[2:4] == ["1", "-"]
    doc = run_json(capsys, "sweep", "--run", str(run_dir), "--loops", "X=1:3", "--split", "hard")
    (row,) = [r for r in doc["convergence_summary"] if r["circuit"] == "X"]
    assert row["rel_change_default"] == doc["convergence"]["hard"]["X"]["rel_change"][1]


def test_raw_weights_of_a_checkpoint_saved_before_ema_was_turned_on(tmp_path, capsys):
    """#27 pass 13: a run resumed with train.ema has checkpoints from before it without EMA weights; --raw-weights on one
    said "(train.ema is off)", which its config.yaml contradicts."""
    run_dir = make_run(tiny_config(tmp_path, "ema_later", "train.ema=0.9"))  # its checkpoint holds no EMA weights
    assert main(["eval", "--run", str(run_dir), "--raw-weights", "--examples", "4"]) == 2
    assert f"keeps no EMA weights at step {STEP} (train.ema was off when it was saved), so" in capsys.readouterr().err


def test_sweep_two_circuits(run_dir, capsys):
    doc = run_json(capsys, "sweep", "--run", str(run_dir), "--loops", "Y=2,4", "--loops", "X=1:3:2", "--split", "hard")
    assert doc["grid"] == {"X": [1, 3], "Y": [2, 4]}
    assert [(r["loops"]["X"], r["loops"]["Y"]) for r in doc["rows"]] == [(1, 2), (1, 4), (3, 2), (3, 4)]
    assert set(doc["convergence"]["hard"]) == {"X", "Y"} and (run_dir / "sweep_X_Y.png").is_file()
    table = sweep_table(doc["rows"], doc["grid"], read_run(run_dir))
    assert "hard [4]: accuracy, rows X, columns Y" in table
    # A later sweep of X alone rewrites sweep.csv: the 2-D plot, whose numbers are gone, goes with it.
    (run_dir / "sweep_X.png").unlink(missing_ok=True)
    doc = run_json(capsys, "sweep", "--run", str(run_dir), "--loops", "X=1:2", "--split", "hard")
    assert not (run_dir / "sweep_X_Y.png").exists() and (run_dir / "sweep_X.png").is_file()


def test_generate(run_dir, capsys):
    doc = run_json(capsys, "generate", "--run", str(run_dir), "--example-split", "hard", "--count", "3",
                   "--loops", "X=1,6")
    assert doc["split"] == "hard" and len(doc["examples"]) == 3 and doc["decoding"] == "autoregressive greedy"
    for ex in doc["examples"]:
        assert " | root(" in ex["prompt"] and len(ex["answer"]["tokens"]) == 1
        assert [p["loops"] for p in ex["predictions"]] == [{"X": 1, "Y": 3}, {"X": 6, "Y": 3}]
        for p in ex["predictions"]:
            assert len(p["tokens"]) == 1 and p["correct"] == (p["tokens"] == ex["answer"]["tokens"])
    assert main(["generate", "--run", str(run_dir), "--count", "3"]) == 0
    out = capsys.readouterr().out
    assert "#1" in out and "true answer" in out and "X=2 Y=3" in out


def test_generate_with_exit_says_the_rule_beside_the_cap(run_dir, text_run_dir, capsys):
    """#27 fifteenth pass: `generate --exit` on a task run showed "X=3" (the cap) in its table and JSON with no word of
    the rule, as if every token ran 3 loops; a text run's line showed the cap alone too (its JSON had the rule)."""
    doc = run_json(capsys, "generate", "--run", str(run_dir), "--count", "2", "--exit", "X=latent_diff:0.1")
    assert doc["exit"] == {"X": "latent_diff:0.1"}
    assert main(["generate", "--run", str(run_dir), "--count", "2", "--exit", "X=latent_diff:0.1"]) == 0
    assert "· X exits by latent_diff:0.1 (its count shown is the cap)\n" in capsys.readouterr().out
    assert main(["generate", "--run", str(text_run_dir), "--prompt", "In", "--max-new-tokens", "2", "--exit",
                 "latent_diff:0.1"]) == 0
    assert re.match(r"\[X=\d+; X exits by latent_diff:0.1, [\d.]+ loops per token\] In", capsys.readouterr().out)
    # --no-cache reports them too, computed as the cached path does (#27 pass 22: it showed the rule and the cap alone)
    exit_args = ["generate", "--run", str(text_run_dir), "--prompt", "In", "--max-new-tokens", "3", "--exit",
                 "latent_diff:0.1"]
    cached, recomputed = run_json(capsys, *exit_args), run_json(capsys, *exit_args, "--no-cache")
    assert recomputed["generations"][0]["tokens"] == cached["generations"][0]["tokens"]
    assert recomputed["generations"][0]["mean_loops"] == pytest.approx(cached["generations"][0]["mean_loops"])
    assert main([*exit_args, "--no-cache"]) == 0
    assert re.match(r"\[X=\d+; X exits by latent_diff:0.1, [\d.]+ loops per token\] In", capsys.readouterr().out)


def test_task_answers_decode_with_the_cache_as_the_recompute_path_does(run_dir, capsys):
    args = ["generate", "--run", str(run_dir), "--example-split", "hard", "--count", "6", "--loops", "X=1,6"]
    cached, recomputed = run_json(capsys, *args), run_json(capsys, *args, "--no-cache")
    assert cached["cache"] == "full" and recomputed["cache"] is None
    assert [[p["tokens"] for p in ex["predictions"]] for ex in cached["examples"]] == \
        [[p["tokens"] for p in ex["predictions"]] for ex in recomputed["examples"]]


def test_generate_answers_alike_compacted_and_masked(run_dir, capsys):
    """#25: --compact on / off with --exit (cached decoding of one-block X: the prefill and every step): the
    same answers."""
    args = ["generate", "--run", str(run_dir), "--example-split", "hard", "--count", "4", "--exit",
            "X=latent_diff:0.2", "--max-loops", "16"]
    on, off = (run_json(capsys, *args, "--compact", c) for c in ("on", "off"))
    assert (on["compact"], off["compact"]) == ("on", "off")  # #27 pass 16: not recorded
    assert [[p["tokens"] for p in ex["predictions"]] for ex in on["examples"]] == \
        [[p["tokens"] for p in ex["predictions"]] for ex in off["examples"]]


def test_compact_is_refused_where_it_chooses_nothing_and_kept_for_act(tmp_path):
    """#27 pass 16: --compact on / off with exits only on circuits of two blocks was accepted and changed nothing
    (only a one-block circuit is compacted); on an ACT run without --exit it was refused as "none can" stop,
    though ACT circuits stop by their own rule (and are compacted)."""
    from types import SimpleNamespace

    from loopformer.cli.common import compact_choice, compact_note
    from loopformer.errors import PlanError

    deep = SimpleNamespace(cfg=tiny_config(tmp_path, "deep", "model.stages.0.circuits.Y.depth=2"))
    on = SimpleNamespace(compact="on")
    with pytest.raises(PlanError, match=r"^--compact on chooses how a one-block circuit runs the tokens that stopped, "
                                        r"and the circuits that stop early have more blocks \(Y: 2\), which always "
                                        r"mask them; drop --compact$"):
        compact_choice(on, deep, ["Y"])
    assert compact_choice(on, deep, ["X", "Y"]) is True
    act = SimpleNamespace(cfg=tiny_config(tmp_path, "act", "model.stages.0.circuits.X.halting.kind=act"))
    assert compact_choice(on, act, []) is True and compact_note(on, act, []) == {"compact": "on"}
    with pytest.raises(PlanError, match="none can"):
        compact_choice(on, act, [], halting=False)
    assert compact_note(SimpleNamespace(compact="auto"), deep, []) == {}
    # #27 pass 26: "(or --loops X=auto)" was named on runs without a rule per difficulty, where it is refused
    with pytest.raises(PlanError, match=r"none can: add --exit, or drop --compact$"):
        compact_choice(on, deep, [])
    per = SimpleNamespace(cfg=tiny_config(tmp_path, "per", "model.stages.0.circuits.Y.loops=per_difficulty(1, 1)"))
    with pytest.raises(PlanError, match=r"none can: add --exit \(or --loops Y=auto\), or drop --compact$"):
        compact_choice(on, per, [])


@pytest.mark.parametrize("argv,message", [
    (["--max-new-tokens", "100000000000"], r"--max-new-tokens 100000000000 needs a [\d,.]+ GiB key/value cache "
                                           r"\([\d,]+ bytes per token\), more than half of this machine's \d+ GiB; "
                                           r"ask for at most [\d,]+ tokens, or keep fewer iterations with --cache last"),
    (["--seed", "99999999999999999999999"], r"--seed must be in 0..4294967295, got 99999999999999999999999"),
    (["--cache", "ring:99999999999"], r"--cache ring:99999999999: ring:K needs K in 1..10000"),
    # #27 pass 7: --cache '' decoded with the full cache; 1e300 divided the logits by inf (numpy's warning on stderr)
    (["--cache", ""], r"--cache : not a cache policy; use full, last, ring:K, first"),
    (["--temperature", "1e300"], r"--temperature 1e\+300 is past the largest, 1e\+30 \(from about 100 on, every "
                                 r"token is about equally likely\)"),
    (["--prompt", "x" * 3_000_000], r"the prompt is 3,000,00\d tokens; attention over 3,000,00\d tokens in batches "
                                    r"of 1 needs about [\d,]+ GiB, more than half of this machine's \d+ GiB \(at most "
                                    r"[\d,]+ tokens fit\); give a shorter prompt \(the run trained on \d+\)"),
])
def test_text_generation_refuses_what_cannot_run(text_run_dir, capsys, argv, message):
    prompt = [] if "--prompt" in argv else ["--prompt", "In"]
    assert main(["generate", "--run", str(text_run_dir), *prompt, *argv]) == 2
    *before, line = capsys.readouterr().err.strip().splitlines()  # the memory check runs after "loaded RUN"
    assert re.search("^error: " + message + "$", line), line
    assert all(b.startswith("loaded ") for b in before), before


def test_non_utf8_prompt_is_one_line(run_dir, capsys):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python's argv holds for these bytes
    assert main(["generate", "--run", str(run_dir), "--prompt", prompt]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: --prompt is not UTF-8 text (byte 0xe9 at character 3); pass the prompt in UTF-8"


def test_text_run(text_run_dir, capsys):
    doc = run_json(capsys, "eval", "--run", str(text_run_dir), "--split", "val")
    (row,) = doc["rows"]
    assert row["split"] == "val" and row["bits_per_byte"] > 0
    assert row["loops"] == {"X": 5}  # configs/text_bytes.yaml eval_loops
    doc = run_json(capsys, "generate", "--run", str(text_run_dir), "--prompt", "In the beginning",
                   "--max-new-tokens", "5", "--loops", "X=1,3", "--top-k", "1000000000000",  # K >= vocab: all
                   "--temperature", "1", "--seed", "9")
    assert [g["loops"] for g in doc["generations"]] == [{"X": 1}, {"X": 3}]
    assert (doc["seed"], doc["max_new_tokens"]) == (9, 5)  # #27 pass 16: a sampled text did not say its seed
    assert all(isinstance(g["text"], str) for g in doc["generations"])
    assert main(["generate", "--run", str(text_run_dir)]) == 2
    assert "trains on text: give --prompt TEXT" in capsys.readouterr().err
    assert main(["generate", "--run", str(text_run_dir), "--prompt", "In", "--top-p", "0.5"]) == 2  # greedy: unused
    assert "--top-p set(s) how tokens are sampled, and --temperature 0 (the default) decodes greedily" in \
        capsys.readouterr().err
    assert main(["generate", "--run", str(text_run_dir), "--prompt", "In", "--count", "3"]) == 2  # was ignored
    assert "--count sets how many examples of a synthetic task are answered" in capsys.readouterr().err
    for flag, value, message in (("--top-p", "0", "--top-p must be in (0, 1] (1 = every token), got 0"),
                                 ("--top-k", "-1", "--top-k must be >= 0 (0 = every token), got -1")):
        # #27 pass 19: each was refused naming both flags ("--top-k must be >= 0 and --top-p in (0, 1]")
        assert main(["generate", "--run", str(text_run_dir), "--prompt", "In", "--temperature", "1", flag, value]) == 2
        assert f"error: {message}\n" == capsys.readouterr().err


@pytest.mark.parametrize("argv, line", [
    (["train"], "error: train needs a config: loopformer train -c configs/quickstart.yaml (or key=value settings "
                "over the defaults, e.g. run.name=mine)"),
    (["train", "configs/quickstart.yaml"], "error: 'configs/quickstart.yaml' is a config file, not a key=value override: "
                                           "give it with --config (e.g. loopformer train -c configs/quickstart.yaml)"),
])
def test_train_without_its_config_is_one_line(tmp_path, monkeypatch, capsys, argv, line):
    """`loopformer train` alone trained the defaults into runs/run; a config given without -c was a 'malformed
    override'. Neither writes anything."""
    monkeypatch.chdir(tmp_path)
    if len(argv) > 1:
        (tmp_path / "configs").mkdir()
        (tmp_path / "configs" / "quickstart.yaml").write_text("seed: 0\n")
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not (tmp_path / "runs").exists()


def test_settings_after_a_flag_are_settings(monkeypatch, capsys):
    """`train a=1 -c cfg b=2` was "unrecognized arguments: b=2" (argparse takes one run of positionals); any other
    unknown argument still is."""
    import loopformer.cli
    from loopformer.cli.common import COMMANDS

    loopformer.cli._import_commands()  # registers them (alone, as with -k, nothing had)
    seen = {}
    help_text, add_args, _ = COMMANDS["train"]
    monkeypatch.setitem(COMMANDS, "train", (help_text, add_args, lambda args: seen.update(vars(args)) or 0))
    assert main(["train", "train.steps=1", "-c", "cfg.yaml", "run.dir=/tmp/x", "seed=3"]) == 0
    assert seen["config"] == "cfg.yaml" and seen["overrides"] == ["train.steps=1", "run.dir=/tmp/x", "seed=3"]
    with pytest.raises(SystemExit):
        main(["train", "-c", "cfg.yaml", "a=1", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("argv, line", [
    # #27 pass 28's leftovers: inspect reads no weights, and the line did not say --step is another command's
    (["inspect", "--run", "runs/x", "--step", "2"], "loopformer inspect: error: unrecognized arguments: --step 2 "
     "(loopformer inspect takes no --step; ablate, activity, convert, eval, export, generate, rys, sweep take it: see "
     "loopformer inspect --help)"),
    (["inspect", "--run", "runs/x", "--stepp", "2"], "loopformer inspect: error: unrecognized arguments: --stepp 2"),
    # #27 pass 29: a short flag of another command named none (`eval -c cfg.yaml`: train's config)
    (["eval", "--run", "runs/x", "-c", "cfg.yaml"], "loopformer eval: error: unrecognized arguments: -c cfg.yaml "
     "(loopformer eval takes no -c; prepare, train take it: see loopformer eval --help)"),
    # #27 pass 37: generate's own flag of that meaning is --example-split, which the line did not name
    (["generate", "--run", "runs/x", "--split", "4x"], "loopformer generate: error: unrecognized arguments: --split 4x "
     "(loopformer generate takes no --split; did you mean --example-split? ablate, activity, eval, rys, sweep take it: "
     "see loopformer generate --help)"),
    (["eval", "--run", "runs/x", "--example-split", "2x"], "loopformer eval: error: unrecognized arguments: "
     "--example-split 2x (loopformer eval takes no --example-split; did you mean --split? generate takes it: see "
     "loopformer eval --help)"),
    (["rys", "--run", "runs/x", "--repeats", "1,,2"], "loopformer rys: error: argument --repeats: an empty item "
     "between commas in '1,,2'; write counts like 1,2,3"),  # read as 1,2
    # #27 pass 40: a second value after a flag's value was named alone ("unrecognized arguments: Y=3")
    (["eval", "--run", "runs/x", "--loops", "X=2", "Y=3"], "loopformer eval: error: unrecognized arguments: Y=3 "
     "(--loops takes one value; give it once per value: --loops X=2 --loops Y=3; see loopformer eval --help)"),
    (["sweep", "--run", "runs/x", "--split=2x", "4x"], "loopformer sweep: error: unrecognized arguments: 4x "
     "(--split takes one value; give it once per value: --split 2x --split 4x; see loopformer sweep --help)"),
    (["eval", "--run", "runs/a", "runs/b"], "loopformer eval: error: unrecognized arguments: runs/b (--run takes one "
     "value; see loopformer eval --help)"),
    (["eval", "--run", "runs/x", "--split", "2x", "X=3"], "loopformer eval: error: unrecognized arguments: X=3"),
    (["eval", "--run", "runs/x", "", "--exampels", "8"], "loopformer eval: error: unrecognized arguments:  --exampels 8 "
     "(did you mean --examples? see loopformer eval --help)"),  # an empty argument before it is no flag
    # #27 pass 40: a flag pasted with a typographic dash, typed with one dash, in capitals or a letter off named no flag
    # (and `—loops X=2` after --run was taken for a second value of --run)
    (["eval", "--run", "runs/x", "\u2014loops", "X=2"], "loopformer eval: error: unrecognized arguments: \u2014loops X=2 "
     "(did you mean --loops? see loopformer eval --help)"),
    (["eval", "--run", "runs/x", "-loops", "X=2"], "loopformer eval: error: unrecognized arguments: -loops X=2 (did you "
     "mean --loops? see loopformer eval --help)"),
    (["eval", "--run", "runs/x", "--Loops", "X=2"], "loopformer eval: error: unrecognized arguments: --Loops X=2 (did "
     "you mean --loops? see loopformer eval --help)"),
    (["eval", "--run", "runs/x", "--exampels", "8"], "loopformer eval: error: unrecognized arguments: --exampels 8 (did "
     "you mean --examples? see loopformer eval --help)"),
    (["eval", "--run", "runs/x", "\u2013c", "x.yaml"], "loopformer eval: error: unrecognized arguments: \u2013c x.yaml "
     "(loopformer eval takes no -c; prepare, train take it: see loopformer eval --help)"),
    # #27 pass 41: a full-width dash (a CJK input method) was read as a second value of the flag before it; a flag
    # after `--` was one this command "takes no"; a flag joined to its value by a no-break space "did you mean" itself
    (["eval", "--run", "runs/x", "--examples", "8", "\uff0d\uff0dloops", "X=2"], "loopformer eval: error: unrecognized "
     "arguments: \uff0d\uff0dloops X=2 (did you mean --loops? see loopformer eval --help)"),
    (["eval", "--run", "runs/x", "--", "--loops", "X=2"], "loopformer eval: error: unrecognized arguments: -- --loops "
     "X=2 (--loops comes after `--`, which ends the flags (what follows is read as values); drop the `--`; see "
     "loopformer eval --help)"),
    (["eval", "--run", "runs/x", "--loops\u00a0X=2"], "loopformer eval: error: unrecognized arguments: --loops\u00a0X=2 "
     "(--loops is joined to what follows by U+00A0, a space that does not separate arguments; type a plain space: "
     "--loops X=2; see loopformer eval --help)"),
    # #27 pass 41's leftover: a space before `=` was "unrecognized arguments: =2" alone; a character that does not show
    # (U+200B pasted after a value) was quoted as if the value were what the user sees
    (["eval", "--run", "runs/x", "--loops", "X", "=2"], "loopformer eval: error: unrecognized arguments: =2 (the space "
     "before '=' made X and =2 two arguments; write X=2; see loopformer eval --help)"),
    (["eval", "--run", "runs/x", "--compact", "on\u200b"], "loopformer eval: error: argument --compact: invalid choice: "
     "'on\\u200b' (choose from 'auto', 'on', 'off') ('on\\u200b' holds U+200B (ZERO WIDTH SPACE), a character that does not "
     "show; retype it without it)"),
    (["eval", "--run", "runs/x", "--loops\u200bX=2"], "loopformer eval: error: unrecognized arguments: --loops\u200bX=2 "
     "(--loops is joined to what follows by U+200B, a space that does not separate arguments; type a plain space: "
     "--loops X=2; see loopformer eval --help)"),
    # #27 pass 42: a choice typed with a look-alike letter (Cyrillic о) was refused as if it were not what it shows
    (["eval", "--run", "runs/x", "--compact", "\u043en"], "loopformer eval: error: argument --compact: invalid choice: "
     "'\u043en' (choose from 'auto', 'on', 'off') ('\u043e' is U+043E (CYRILLIC SMALL LETTER O), which is not ASCII; "
     "retype the name)"),
    (["eval", "--run", "runs/x", "--examples", "1_0"], "loopformer eval: error: argument --examples: '1_0' is written "
     "with '_'; write the number's digits alone (e.g. 10, not 1_0)"),
    # #27 pass 40's leftover: Python's int() and float() read any script's digits (`--max-loops ٣` was 3)
    (["eval", "--run", "runs/x", "--max-loops", "\u0663"], "loopformer eval: error: argument --max-loops: '\u0663' is a "
     "digit of another script (U+0663); write ASCII digits 0-9"),
    (["generate", "--run", "runs/x", "--temperature", "\u0660.5"], "loopformer generate: error: argument --temperature: "
     "'\u0660.5': '\u0660' is a digit of another script (U+0660); write ASCII digits 0-9"),
    (["generate", "--run", "runs/x", "--seed", "\uff13"], "loopformer generate: error: argument --seed: '\uff13' is a "
     "digit of another script (U+FF13); write ASCII digits 0-9"),
    (["rys", "--run", "runs/x", "--repeats", "1,\u0662"], "loopformer rys: error: argument --repeats: '1,\u0662': "
     "'\u0662' is a digit of another script (U+0662); write ASCII digits 0-9"),
    (["prepare", "-c", "x.yaml", "--out", "o", "--chunk-tokens", "\u0664"], "loopformer prepare: error: argument "
     "--chunk-tokens: '\u0664' is a digit of another script (U+0664); write ASCII digits 0-9"),
])
def test_argparse_refusals_say_what_was_meant(argv, line, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1] == line, err


@pytest.fixture(scope="module")
def no_checkpoint_run(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("empty") / "untrained"
    path.mkdir()
    shutil.copy(run_dir / "config.yaml", path / "config.yaml")
    return path


@pytest.mark.parametrize("argv, message", [
    (["eval", "--loops", "Z=4"], "unknown circuit 'Z' in --loops Z=4; this run's circuits are X, Y"),
    (["eval", "--loops", "X=0"], "--loops X=0: loop counts must be >= 1, got 0"),
    (["sweep", "--loops", "X=1:"], "malformed --loops X=1:"),
    (["eval", "--loops", "X16"], "malformed --loops X16"),
    (["eval", "--loops", "X=1:8"], "one count per circuit"),
    (["eval", "--ablate", "W"], "--ablate W: unknown circuit"),
    (["eval", "--split", "nope"], "this run has no eval split 'nope'; its splits are train, hard"),
    (["generate", "--example-split", "nope"], "no eval split 'nope'"),
    (["eval", "--step", "99"], f"no checkpoint for step 99 in .*: available steps are {STEP}"),
    (["generate", "--prompt", "hello"], "trains on the synthetic task 'pointer_chase'.*use --example-split"),
    (["eval", "@missing"], "--run .* does not exist \\(point --run at"),
    (["ablate", "@untrained"], "no checkpoint in .*untrained/checkpoints: train first"),
    # #27 pass 19: a file was "no such directory", and a run's checkpoints/ "train first"
    (["inspect", "@config"], r"--run .*/config.yaml is a file, not a folder \(point --run at the run that holds it, "),
    (["inspect", "@checkpoints"], r"checkpoints/config.yaml is missing \(.*checkpoints lies inside the run .*: point "
                                  r"--run at it\)$"),
])
def test_user_errors(run_dir, no_checkpoint_run, capsys, argv, message):
    if argv[1].startswith("@"):
        where = {"@missing": run_dir.parent / "missing", "@untrained": no_checkpoint_run,
                 "@config": run_dir / "config.yaml", "@checkpoints": run_dir / "checkpoints"}[argv[1]]
        argv = [argv[0], "--run", str(where)]
    else:
        argv = [argv[0], "--run", str(run_dir), *argv[1:]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), lines


def test_a_run_that_is_a_symlink_loop_is_named_so(tmp_path, capsys):
    """#27 pass 17: a --run symlink in a loop (or to nothing) was "no such directory": it is there."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert main(["eval", "--run", str(tmp_path / "loop")]) == 2
    assert "--run " + str(tmp_path / "loop") + " is a symlink that leads nowhere (or in a loop)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["train", "-c", "a.yaml", "-c", "b.yaml"], "--config/-c"),
                                        (["train", "--config=a.yaml", "-c", "a.yaml"], "--config/-c"),
                                        (["eval", "--run", "A", "--run", "B"], "--run"),
                                        (["generate", "--run", "A", "--temperature", "0.5", "--temperature", "1"],
                                         "--temperature")])
def test_a_single_value_flag_given_twice_is_refused(capsys, argv, flag):
    """Pass 6: argparse let the last of two values win with no word (`train -c a.yaml -c b.yaml` trained b alone,
    `eval --run A --run B` evaluated B). Repeatable flags (--loops, --exit, --split) stay repeatable."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"error: {flag} is given twice; give it once" in capsys.readouterr().err


def test_repeatable_flags_stay_repeatable(run_dir, capsys):
    assert main(["eval", "--run", str(run_dir), "--split", "train", "--split", "hard", "--examples", "8",
                 "--loops", "X=1", "--loops", "Y=2"]) == 0
    assert "given twice" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "rys"])
def test_an_empty_probe_is_refused(text_run_dir, capsys, command):
    """#27 pass 7: `--probe ''` was taken for no --probe: the eval splits were scored instead."""
    with pytest.raises(SystemExit) as info:
        main([command, "--run", str(text_run_dir), "--probe", ""])
    assert info.value.code == 2
    assert "argument --probe: expected a probe file (e.g. asset:probes_arithmetic.jsonl), got ''" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "rys"])
def test_a_probe_file_is_checked_before_the_weights_are_read(text_run_dir, tmp_path, capsys, monkeypatch, command):
    """#27 pass 25: a --probe file that is missing or malformed (or --probe with --split) was refused after the run's
    weights were loaded (a "loaded ... at step" line above the error; minutes for a large run)."""
    for module in ("eval", "rys"):
        monkeypatch.setattr(f"loopformer.cli.{module}.load_run", lambda *a, **k: pytest.fail("the weights were read"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    for argv, message in (([str(tmp_path / "none.jsonl")], "does not exist"), ([str(tmp_path / "bad.jsonl")], "bad.jsonl"),
                          (["asset:probes_arithmetic.jsonl", "--split", "val"], "give either --probe FILE or --split")):
        assert main([command, "--run", str(text_run_dir), "--probe", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--run", ""], "--run '': name a run directory made by `loopformer train`, e.g. runs/quickstart"),
    (["import", "--hf", "", "--out", "x"], "--hf '': name a local Hugging Face model folder (config.json, "
                                           "*.safetensors, tokenizer.json)"),
])
def test_an_empty_folder_flag_is_named(tmp_path, capsys, argv, message, monkeypatch):
    """#27 pass 7: '' was the current directory ("no run at .", "--hf .: ... missing")."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not list(tmp_path.iterdir())


def test_rys_on_a_run_without_plain_layers_says_so(tmp_path, capsys):
    """#27 pass 7: with no prelude and no coda, each stack's refusal pointed at the other ("try --stack coda")."""
    flat = make_run(tiny_config(tmp_path, "flat", "model.prelude=0"))
    for stack in ([], ["--stack", "prelude"], ["--stack", "coda"]):
        assert main(["rys", "--run", str(flat), *stack]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {flat} has no plain layers to duplicate (model.prelude and model.coda: 0): every layer is in its "
            f"circuits, which loop already; rys scans the plain layers of a prelude or coda (`loopformer sweep` "
            f"varies a circuit's loops)")


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--exit", "X=latent_diff:0.1,0.1"], "--exit X=latent_diff:0.1,0.1 lists the threshold latent_diff:0.1 "
                                                   "twice; give each once"),
    (["sweep", "--exit", "X=latent_diff:0.1,1e-1"], "lists the threshold latent_diff:0.1 twice"),
    (["sweep", "--loops", "X=2,4,2"], "--loops X=2,4,2 lists 2 twice; give each count once"),
    (["eval", "--loops", "X=2,2"], "--loops X=2,2 lists 2 twice"),
])
def test_a_list_entry_given_twice_is_refused(run_dir, capsys, argv, message):
    """#27 pass 7: `sweep --exit X=latent_diff:0.1,0.1` evaluated and wrote the same setting twice; it was then
    merged with no word, as loop counts and rys repeats were, where every other list refuses a repeat (--split,
    --ablate, eval.sweep_loops, the bench scripts' lists): pass 18 refuses it everywhere."""
    assert main([argv[0], "--run", str(run_dir), *argv[1:]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_inspect_reads_no_weights_so_takes_no_step(run_dir, capsys):
    """`inspect --step 99` printed the run as if the step existed (it reads no checkpoint): refused by argparse."""
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--run", str(run_dir), "--step", "99"])
    assert info.value.code == 2 and "unrecognized arguments: --step 99" in capsys.readouterr().err


def test_inspect(run_dir, capsys):
    assert main(["inspect", "--run", str(run_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["notation"] == ["(X1)^2 ⊕ (Y1)^3"] and doc["steps"] == [STEP]
    assert set(doc["circuits"]) == {"X", "Y"} and doc["circuits"]["X"]["schedule"]["loops"] == "uniform(1, 3)"
    assert doc["params"]["stages/0/circuits/X/blocks/attn/qkv/kernel"] == [1, 8, 24]
    assert any("/circuits/Y/" in p for p in doc["params"])
    assert sum(doc["circuits"][c]["params"] for c in "XY") + doc["shared_params"] == doc["total_params"]
    assert main(["inspect", "--run", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "stages/0/circuits/X/write/kernel" in text and f"checkpoints on disk: steps {STEP}" in text


# ----------------------------------------------------------------------------- issue #17


@pytest.mark.parametrize("command, written", [("sweep", "sweep.csv"), ("ablate", "ablation.csv")])
def test_a_read_only_run_is_refused_before_any_work(run_dir, tmp_path, capsys, monkeypatch, command, written):
    """Issue #17.7: sweep and ablate on a read-only run computed everything, then died with a traceback
    writing their csv. They now check first and say how to go on (a copy of the run, which works)."""
    from loopformer.cli import common

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    def no_work(*a, **k):
        raise AssertionError("the run was restored before the write check")

    monkeypatch.setattr(common.tempfile, "NamedTemporaryFile", read_only)  # as root, chmod cannot do it
    monkeypatch.setattr(f"loopformer.cli.{command}.load_run", no_work)
    argv = [command, "--run", str(run_dir)] + (["--loops", "X=1:2"] if command == "sweep" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(
        rf"error: .* is not writable \(Permission denied\), and this command writes {written}.*; copy the run "
        r"\(cp -r .*\) and pass --run ", err), err
    monkeypatch.undo()
    copy_cmd = re.search(r"\((cp -r [^)]*)\)", err).group(1)
    subprocess.run(copy_cmd, shell=True, check=True, cwd=tmp_path)
    copy = tmp_path / re.search(r"--run (\S+)$", err).group(1)
    assert main([*argv[:2], str(copy), *argv[3:], "--examples", "8"]) == 0
    assert (copy / written).is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_chmod_read_only_run(run_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    shutil.copytree(run_dir, ro)
    ro.chmod(0o555)
    try:
        assert main(["ablate", "--run", str(ro)]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_analysis_needs_no_lock(run_dir, capsys):
    """Training locks its run directory; reading it (eval, generate, ...) does not, so a running training
    can be looked at."""
    from loopformer.runs.lock import run_lock

    with run_lock(run_dir, process=0):
        assert main(["eval", "--run", str(run_dir), "--examples", "8", "--json"]) == 0
        assert main(["generate", "--run", str(run_dir), "--count", "1", "--json"]) == 0
    capsys.readouterr()


def test_loops_help_gives_the_real_limit(capsys):
    """Issue #17.12: --loops help said 1..1000; the limit is MAX_LOOPS (10000)."""
    from loopformer.model.plan import MAX_LOOPS

    for command in ("eval", "generate", "sweep"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(int(n) == MAX_LOOPS for n in re.findall(r"1\.\.(\d+)", text)), (command, text)
        if command != "sweep":
            assert f"1..{MAX_LOOPS}" in text, command


def test_help_prints_a_percent_sign_once(capsys):
    """#27 pass 16: the epilogs of activity and sweep said "10%%" and "0.1%%" (argparse formats help strings, not
    epilogs, with %)."""
    from loopformer.cli.common import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "%%" not in text, command
    assert "exceeds 10% of" in " ".join(_help(capsys, "activity").split())


def _help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_a_terminal_that_cannot_encode_gets_escapes_not_a_traceback():
    """#27 pass 16: under PYTHONIOENCODING=ascii (or a Latin-1 locale) `eval --help` was a UnicodeEncodeError
    traceback at its ±; now the character is written as an escape."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-m", "loopformer", "eval", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "\\xb11%" in done.stdout


def test_a_byte_that_is_not_utf8_is_written_as_an_escape_in_every_line(monkeypatch):
    """#27 pass 34: a path or flag value holding a byte that is not UTF-8 (`train -c $'c\\xff.yaml'`, argparse's
    lines) was written as ``\\udcff`` on stderr, a character the user never typed; `errors.printable` writes ``\\xff``
    (and lines that use it were already so)."""
    import io

    from loopformer import cli
    from loopformer.errors import printable

    for encoding, expected in (("utf-8", b"c\\xff\xc2\xb1.yaml\n"), ("ascii", b"c\\xff\\xb1.yaml\n")):
        stream = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="backslashreplace")
        monkeypatch.setattr(sys, "stderr", stream)
        cli._escape_unencodable()
        print("c\udcff\u00b1.yaml", file=sys.stderr)
        stream.flush()
        assert stream.buffer.getvalue() == expected
    assert printable("c\udcff.yaml") == "c\\xff.yaml"


@pytest.mark.parametrize("argv, line", [
    (["rys", "--stack", "\udcff"], "loopformer rys: error: argument --stack: invalid choice: '\\xff' (choose from"),
    (["eval", "--examples", "1\udcff"], "loopformer eval: error: argument --examples: expected a positive integer, "
                                        "got '1\\xff'"),
    # #27 pass 37: the six characters \udcff typed as text (repr: '\\udcff') were written '\\xff'
    (["rys", "--stack", "\\udcff"], "loopformer rys: error: argument --stack: invalid choice: '\\\\udcff' (choose"),
])
def test_argparse_lines_quoting_a_byte_that_is_not_utf8_write_an_escape(capsys, argv, line):
    """#27 pass 36: argparse quotes a flag's value with repr, which wrote the byte \\xff as '\\udcff' (pass 35 fixed the
    bench scripts' lines, not loopformer's own)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and line in err and ("udc" not in err or "\\\\udc" in line), err


def test_eval_and_sweep_with_exits(run_dir, capsys):
    doc = run_json(capsys, "eval", "--run", str(run_dir), "--exit", "latent_diff:0.05", "--max-loops", "16",
                   "--split", "hard")
    (row,) = doc["rows"]
    assert row["exit"] == {"X": "latent_diff:0.05", "Y": "latent_diff:0.05"} and row["loops"] == {"X": 16, "Y": 16}
    assert 1 <= row["mean_loops"]["X"] <= 16 and sum(row["histogram"]["X"].values()) > 0
    # --compact on / off: the same rows, the executed work measured differently (one-block X compacts)
    docs = [run_json(capsys, "eval", "--run", str(run_dir), "--exit", "X=latent_diff:0.2", "--max-loops",
                     "16", "--split", "hard", "--compact", c) for c in ("on", "off")]
    # #27 pass 16: computed_loops depends on --compact, and the document did not say which was chosen
    assert [d["compact"] for d in docs] == ["on", "off"]
    on, off = (d["rows"][0] for d in docs)
    assert len(on["histogram"]["X"]) > 1 and on["histogram"] == off["histogram"]  # tokens stop at several counts
    for key in ("loss", "accuracy"):
        assert on[key] == pytest.approx(off[key], rel=1e-5), key
    assert on["mean_loops"] == off["mean_loops"] and on["computed_loops"]["X"] < off["computed_loops"]["X"]
    doc = run_json(capsys, "sweep", "--run", str(run_dir), "--exit", "X=latent_diff:1e-6,0.05,10", "--split", "hard")
    used = [r["mean_loops"]["X"] for r in doc["rows"]]
    assert [r["exit"]["X"] for r in doc["rows"]] == ["latent_diff:1e-06", "latent_diff:0.05", "latent_diff:10"]
    assert used == sorted(used, reverse=True) and used[-1] == 1.0  # looser thresholds stop earlier
    assert doc["compact"] == "auto"
    assert doc["compiles"] <= 2  # thresholds are runtime inputs: one program per batch shape and function
    assert all(r["loops"]["Y"] == 3 for r in doc["rows"])  # Y has no rule: its eval_loops
    doc = run_json(capsys, "generate", "--run", str(run_dir), "--example-split", "hard", "--count", "2",
                   "--exit", "X=kl:1e-3", "--max-loops", "8")
    assert [p["loops"] for p in doc["examples"][0]["predictions"]] == [{"X": 8, "Y": 3}]


def test_context_diff_from_the_command_line(run_dir, text_run_dir, capsys):
    """#25: context_diff in eval (every token waits for the tokens before it: never fewer loops than latent_diff),
    on a task run's answers (the recompute path) and refused with the cache on a text prompt."""
    rows = [run_json(capsys, "eval", "--run", str(run_dir), "--split", "hard", "--exit", f"X={k}:0.05")["rows"][0]
            for k in ("latent_diff", "context_diff")]
    assert rows[1]["exit"]["X"] == "context_diff:0.05" and rows[1]["mean_loops"]["X"] >= rows[0]["mean_loops"]["X"]
    doc = run_json(capsys, "generate", "--run", str(run_dir), "--example-split", "hard", "--count", "2",
                   "--exit", "X=context_diff:0.05", "--max-loops", "8")
    assert doc["exit"] == {"X": "context_diff:0.05"} and doc["cache"] is None
    assert main(["generate", "--run", str(text_run_dir), "--prompt", "In", "--max-new-tokens", "2", "--exit",
                 "context_diff:0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # refused before the checkpoint is read (#27 pass 28's leftover)
    assert len(err) == 1 and "cannot run the exit rule context_diff" in err[0] and "use --no-cache" in err[0], err
    assert main(["generate", "--run", str(text_run_dir), "--prompt", "In", "--max-new-tokens", "2", "--exit",
                 "context_diff:0.1", "--no-cache"]) == 0


@pytest.mark.parametrize("extra, named", [(["--cache", "last"], "--cache"), (["--continuous"], "--continuous"),
                                          (["--cache", "ring:2", "--continuous"], "--cache and --continuous")])
def test_a_rule_cached_decoding_cannot_run_names_the_cache_flags_to_drop(text_run_dir, capsys, extra, named):
    """#27 pass 26: beside --cache or --continuous the line said "use --no-cache", and --no-cache beside them is
    refused in turn (they would do nothing): the fix it gave was a second error. It now says what --no-cache
    replaces."""
    argv = ["generate", "--run", str(text_run_dir), "--prompt", "In", "--max-new-tokens", "2"]
    for rule in ("context_diff:0.1", "patience:2"):
        assert main([*argv, "--exit", rule, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: decoding with a cache cannot run the exit rule {rule.split(':')[0]} of circuit X")
        assert err.endswith(f"; use --no-cache in place of {named} (recomputes the prefix every token)"), err

@pytest.mark.parametrize("argv, message", [
    (["eval", "--exit", "kl:1e-3"], "kl reads the model's output .* name it, e.g. --exit X=kl:1e-3"),
    (["eval", "--exit", "learned:q=0.5"], "circuit X was trained without a halting head"),
    (["eval", "--exit", "latent_diff:0.1,0.01"], "one threshold per rule; use `loopformer sweep`"),
    (["eval", "--exit", "Z=latent_diff:0.1"], "unknown circuit 'Z' in --exit"),
    (["sweep", "--exit", "latent:0.1"], "is not one of latent_diff:EPS"),
    (["sweep"], "sweep needs --loops CIRCUIT=A:B .* or --exit RULE"),
])
def test_exit_errors(run_dir, capsys, argv, message):
    assert main([argv[0], "--run", str(run_dir), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_rys_on_a_looped_run_says_what_it_scanned(run_dir, tmp_path, capsys):
    """Issue #27: on a looped run rys scans a plain stack's layers, and says so (not "best of 1 settings"); it names
    the other stack only when that has layers (#27 pass 26: "--stack coda scans the other stack" on a run without a
    coda, where --stack coda is refused)."""
    copy = shutil.copytree(run_dir, tmp_path / "looped")  # rys writes rys.csv into the run: not the shared one
    doc = run_json(capsys, "rys", "--run", str(copy), "--split", "train")
    assert doc["stack"] == "prelude" and doc["layers"] == 1
    assert "a looped run: rys duplicates layers of its plain prelude, not its circuits X, Y" in doc["note"]
    assert "--stack" not in doc["note"] and "loopformer convert" in doc["note"]  # model.coda: 0
    assert main(["rys", "--run", str(copy), "--stack", "coda"]) == 2
    assert "has no coda layers to duplicate" in capsys.readouterr().err
    both = make_run(tiny_config(tmp_path, "both", "model.coda=1"))
    doc = run_json(capsys, "rys", "--run", str(both), "--split", "train")
    assert "which loop already; --stack coda scans the other stack, and `loopformer convert`" in doc["note"]


def test_probe_scores_the_answers_against_a_reference(text_run_dir, tmp_path, capsys):
    """Issue #26: `eval --probe` scores each answer given its prompt: the loss is the mean negative
    log-likelihood of the answers' tokens and the accuracy the share of answers that are the argmax token by
    token (what greedy decoding reproduces), both computed here from the full forward pass."""
    import jax
    import numpy as np

    from loopformer.evaluation.run import load_run
    from loopformer.inference.generate import logits_fn, prompt_ids, tokenizer_of

    probes = [("In the beginning", " God"), ("And God said", ", Let"), ("the", " earth")]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in probes))
    doc = run_json(capsys, "eval", "--run", str(text_run_dir), "--probe", str(path))
    (row,) = doc["rows"]
    assert row["split"] == "probe" and row["examples"] == 3 and doc["probe"] == str(path)
    run = load_run(read_run(text_run_dir))
    tok, fn = tokenizer_of(run.info.data), logits_fn(run.model)
    nll, tokens, exact = 0.0, 0, 0
    for prompt, answer in probes:
        p, a = prompt_ids(tok, prompt), tok.encode(answer)
        logits = np.asarray(fn(run.params, np.asarray([p + a]), run.info.full_loops()))[0, len(p) - 1 : -1]
        logp = np.asarray(jax.nn.log_softmax(logits))
        nll -= float(sum(logp[i, t] for i, t in enumerate(a)))
        tokens += len(a)
        exact += bool((logits.argmax(-1) == np.asarray(a)).all())
    assert row["loss"] == pytest.approx(nll / tokens, rel=1e-4) and row["accuracy"] == pytest.approx(exact / 3)
    # the shipped set is what its generator writes, and rys scans on it
    from loopformer.data.probes import ARITHMETIC, arithmetic_probes, read_probes

    assert read_probes(f"asset:{ARITHMETIC}") == arithmetic_probes(64, seed=0)
    copy = shutil.copytree(text_run_dir, tmp_path / "text")
    scan = run_json(capsys, "rys", "--run", str(copy), "--probe", f"asset:{ARITHMETIC}")
    assert scan["probe"] == f"asset:{ARITHMETIC}" and {r["split"] for r in scan["rows"]} == {"probe"}
    assert all(0 <= r["accuracy"] <= 1 for r in scan["rows"] + scan["baseline"])  # greedy exact match, kept
    assert main(["eval", "--run", str(text_run_dir), "--probe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "probe " + str(path) in out and "windows per split" not in out and "exact)" in out
    assert main(["eval", "--run", str(text_run_dir), "--probe", str(path), "--split", "val"]) == 2
    assert "give either --probe FILE or --split NAME" in capsys.readouterr().err


def test_a_text_sweep_reports_bits_per_byte(text_run_dir, tmp_path, capsys):
    """A text window's exact match means nothing: the sweep table of a text run shows bits per byte."""
    copy = shutil.copytree(text_run_dir, tmp_path / "text_sweep")  # sweep writes into the run
    assert main(["sweep", "--run", str(copy), "--loops", "X=1:2"]) == 0
    out = capsys.readouterr().out
    assert "val bits/byte" in out and "val acc" not in out


def test_a_copied_run_does_not_resume_the_original(run_dir, tmp_path, capsys):
    """Issue #27 (second pass): a run's config.yaml names its run directory; training the config of a copy would
    resume and change the original. Refused in one line that says how to train the copy."""
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert main(["train", "-c", str(copy / "config.yaml"), "train.steps=99"]) == 2
    err = capsys.readouterr().err
    assert f"is the config of the run in {copy}" in err and f"run.dir={tmp_path} run.name=copy" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_runs_config_is_a_template_for_a_run_the_settings_name(run_dir, tmp_path):
    """Issue #27 (seventeenth pass): `train -c RUN/config.yaml run.name=new` was refused as a copied run that "would
    resume" run.name=new (which did not exist), and its fix trained the original; the settings name the run."""
    from loopformer.cli.train import check_own_run
    from loopformer.errors import ConfigError

    config = str(run_dir / "config.yaml")
    check_own_run(config, tmp_path / "new", ["train.steps=9", f"run.dir={tmp_path}", "run.name=new"])
    check_own_run(config, run_dir.parent / "new", ["run.name=new"])
    with pytest.raises(ConfigError, match="a copied or moved run"):
        check_own_run(config, tmp_path / "new", ["train.steps=9"])


def test_a_copied_runs_fix_is_quoted_for_the_shell(run_dir, tmp_path):
    """#27 pass 30: a copy named with a space (`my run`) was told to add `run.name=my run`, two words in a shell, the
    second refused; the settings are quoted, and followed they name the copy."""
    import shlex

    from loopformer.cli.train import check_own_run
    from loopformer.config import load_config
    from loopformer.errors import ConfigError

    copy = shutil.copytree(run_dir, tmp_path / "my run")
    with pytest.raises(ConfigError) as info:
        check_own_run(str(copy / "config.yaml"), run_dir, [])
    assert f"Add run.dir={tmp_path} 'run.name=my run' to train this copy" in str(info.value)
    fix = shlex.split(str(info.value).split("Add ")[1].removesuffix(" to train this copy"))
    assert load_config(copy / "config.yaml", fix).run_dir == copy
    check_own_run(str(copy / "config.yaml"), copy, fix)


def test_outputs_inside_a_run_are_refused_and_step_0_is_a_step(run_dir, capsys):
    """A folder written into a run can be read as a checkpoint or pruned with them; --step 0 names the only
    checkpoint of an imported or converted run (it was refused as not positive)."""
    assert main(["export", "--run", str(run_dir), "--out", str(run_dir / "checkpoints" / "99")]) == 2
    assert f"is inside the run {run_dir}" in capsys.readouterr().err
    from loopformer.errors import ConfigError
    from loopformer.train.newrun import out_dir

    with pytest.raises(ConfigError, match="is inside the run"):  # convert and import place their --out by it
        out_dir(str(run_dir / "sub"))
    assert main(["eval", "--run", str(run_dir), "--step", "0"]) == 2
    err = capsys.readouterr().err
    assert "positive integer" not in err and "step 0" in err


def test_an_out_or_run_dir_that_is_a_file_is_named_before_any_work(tmp_path, run_dir, capsys):
    """#27 pass 20: convert or import --out FILE failed after reading the weights as "writing the run failed (Not a
    directory)", --out FILE/sub as "cannot write to FILE (File exists)", and train with run.name naming a file as
    "run.dir: cannot write to FILE (File exists)"; prepare and export named the file."""
    from loopformer.config import load_config
    from loopformer.errors import ConfigError
    from loopformer.runs.prepare import make_run_dir
    from loopformer.train.newrun import out_dir

    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(ConfigError, match=rf"^--out {file} is a file, not a directory; choose another --out$"):
        out_dir(str(file))
    with pytest.raises(ConfigError, match=rf"^--out {file}/sub: {file} is a file, not a directory; choose another"):
        out_dir(str(file / "sub"))
    for overrides in ([f"run.dir={tmp_path}", "run.name=notes.txt"], [f"run.dir={file}", "run.name=x"]):
        with pytest.raises(ConfigError, match=rf"^run.dir / run.name: {file} is a file, not a directory; set run.dir="):
            make_run_dir(load_config(None, overrides))
    assert file.read_text() == "mine"
    # #27 pass 30: a dangling link on the way was "cannot write to ... (File exists)", naming no link
    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    for overrides in ([f"run.dir={tmp_path}", "run.name=gone"], [f"run.dir={link}", "run.name=x"]):
        with pytest.raises(ConfigError, match=rf"^run.dir / run.name: {link} is a symlink that leads nowhere \(or in "
                                              rf"a loop\), not a directory; set run.dir="):
            make_run_dir(load_config(None, overrides))
    with pytest.raises(ConfigError, match=rf"^--out {link}/sub: {link} is a symlink that leads nowhere"):
        out_dir(str(link / "sub"))
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    # #27 pass 31: a link in a loop on the way was named as --out itself ("--out loopa/sub is a symlink ...; remove
    # it"), which is no link: `rm loopa/sub` failed
    (tmp_path / "loopa").symlink_to(tmp_path / "loopb")
    (tmp_path / "loopb").symlink_to(tmp_path / "loopa")
    with pytest.raises(ConfigError, match=rf"^--out {tmp_path}/loopa/sub: {tmp_path}/loopa is a symlink that leads "
                                          rf"nowhere \(or in a loop\); remove it or choose another --out$"):
        out_dir(str(tmp_path / "loopa" / "sub"))
    with pytest.raises(ConfigError, match=rf"^--out {tmp_path}/loopa is a symlink that leads nowhere"):
        out_dir(str(tmp_path / "loopa"))


def test_generate_defaults_to_the_first_split_with_answers(tmp_path):
    """A mixture whose text entry comes first: `generate` without --example-split refused "--example-split
    kjv/val: a text entry's windows have no answers", a flag not given; it answers the first task split (issue 27
    pass 11), and says so when every split is text."""
    from types import SimpleNamespace

    from loopformer.cli.generate import _first_answered
    from loopformer.errors import AnalysisError

    entries = [SimpleNamespace(task=None), SimpleNamespace(task="prefix_parity")]
    data = SimpleNamespace(entries=entries, entry_of_split=lambda s: (0 if s.startswith("kjv/") else 1, s))
    info = SimpleNamespace(path=tmp_path, data=data, splits=["kjv/val", "kjv/train", "prefix_parity/train"])
    assert _first_answered(info) == "prefix_parity/train"
    assert _first_answered(SimpleNamespace(path=tmp_path, data=object(), splits=["train", "hard"])) == "train"
    with pytest.raises(AnalysisError, match="every eval split is a text entry's"):
        _first_answered(SimpleNamespace(path=tmp_path, data=data, splits=["kjv/val"]))


@pytest.mark.parametrize("line", ['{"step": 3, "changes": [garbage', '{"step": 4, "changes": [1]}', "[]", "[1, 2, 3]",
                                  '"text"', "[" * 5000])
def test_inspect_names_a_damaged_line_of_config_changes(run_dir, tmp_path, capsys, line):
    """#27 pass 11: a config_changes.jsonl line edited by hand was a JSONDecodeError (or KeyError) traceback; pass 23:
    a line holding a list or a string other than [] was an AttributeError traceback; pass 24: a line nested 5,000
    levels deep was a RecursionError traceback (`loopformer.jsontext`)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "config_changes.jsonl").write_text(line + "\n")
    assert main(["inspect", "--run", str(copy)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: {copy}/config_changes.jsonl:1: not a record of the run's changes")


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_on_stdout_is_one_line(run_dir, monkeypatch, capsys):
    """#27 pass 11: `loopformer inspect ... | head -1` (or `| true`) ended in a BrokenPipeError traceback, `train`'s
    too; now one line on stderr and status 141, as a pipe's writer ends."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["inspect", "--run", str(run_dir)]) == 141
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("stopped: standard output was closed")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line(run_dir):
    """#27 pass 16: stdout on a full disk (`> out.json`; here /dev/full) was an OSError traceback from print, and
    `train` said "writing into RUN failed ... free some space (df -h RUN)", blaming its run directory."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "loopformer", "inspect", "--run", str(run_dir)], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: standard output could not be written (No space left on device); what the command prints there is "
        "lost: send it where there is space (or to /dev/null)"]


def test_a_closed_stdout_is_refused_before_any_work():
    """#27 pass 11: with stdout closed (`>&-`) every print was dropped and the command ended with status 0."""
    code = "import sys; from loopformer.cli import main; sys.exit(main(['eval', '--run', 'nowhere']))"
    done = subprocess.run(["sh", "-c", 'exec "$0" -c "$1" >&-', sys.executable, code], stderr=subprocess.PIPE,
                          text=True, timeout=60)
    assert done.returncode == 2 and "error: standard output is closed" in done.stderr


def test_a_run_folder_this_user_may_not_read_is_named(run_dir, capsys, monkeypatch):
    """#27 pass 18, as a user other than root (chmod 000 on the run): a PermissionError traceback naming config.yaml."""
    from pathlib import Path

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != run_dir and real(p, mode, **k))
    assert main(["eval", "--run", str(run_dir)]) == 2
    assert capsys.readouterr().err == (f"error: --run {run_dir}: this user may not read the folder; make it readable "
                                       f"(chmod -R u+rX {run_dir})\n")


AS_ANOTHER_USER = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                     reason="drops root's permission override")


def _as_another_user(closed, argvs, cwd):  # noqa: ANN001, ANN202
    """`loopformer` with each of ``argvs`` (from ``cwd``), run as root without the capabilities that override
    permissions, so that it meets ``closed``, chmod 000 meanwhile, as another user does."""
    code = "import sys; from loopformer.cli import main; sys.exit(main(sys.argv[1:]))"
    os.chmod(closed, 0)
    try:
        return [subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", sys.executable,
                                "-c", code, *argv], capture_output=True, text=True, timeout=300, cwd=cwd,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
                for argv in argvs]
    finally:
        os.chmod(closed, 0o755)


@AS_ANOTHER_USER
def test_a_run_behind_a_folder_this_user_may_not_open_is_named(tmp_path):
    """#27 pass 31, as a user other than root (a folder on the way chmod 000): `--run` of a run behind it said it
    "does not exist" (point --run at a directory made by `loopformer train`, which it is), as did `--config` of its
    config.yaml: the folder is named, with its fix. Run as root without the capabilities that override permissions."""
    run = tmp_path / "closed" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    done = _as_another_user(tmp_path / "closed", (["eval", "--run", str(run)],
                                                  ["train", "--config", str(run / "config.yaml")],
                                                  ["train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                                                   f"run.dir={tmp_path / 'closed' / 'runs'}"]), ROOT)
    closed = tmp_path / "closed"
    reach = f"cannot be reached: this user may not open {closed} on its way; make it readable (chmod u+rx {closed})"
    assert done[0].returncode == 2
    assert done[0].stderr == f"error: --run {run} {reach}, or copy the run where this user may\n"
    assert done[1].returncode == 2 and done[1].stderr == (
        f"error: config file {run / 'config.yaml'} {reach}; pass --config with a path to a YAML file, e.g. "
        f"configs/quickstart.yaml\n")
    # a path a command makes behind it (run.dir) was "RUN: Permission denied for this user; make it readable"
    assert done[2].returncode == 2 and done[2].stderr == (
        f"error: {closed / 'runs' / 'quickstart'} {reach}, or use a path outside it\n")


@AS_ANOTHER_USER
def test_a_path_through_a_folder_this_user_may_not_open_by_dot_dot_is_named(tmp_path):
    """#27 pass 32, as a user other than root: `--run closed/../run` passes through `closed` (the system walks the
    path one name at a time), and the check of the normalized path (`run`) called it "does not exist"; `export --out
    closed/a/hf` named `closed/a/config.yaml`, a file the user never gave. Both name the folder and its chmod."""
    (tmp_path / "closed").mkdir()
    (tmp_path / "run").mkdir()
    done = _as_another_user(tmp_path / "closed", (["eval", "--run", "closed/../run"],
                                                  ["export", "--run", "run", "--out", "closed/a/hf"]), tmp_path)
    closed = tmp_path / "closed"
    assert done[0].returncode == 2 and done[0].stderr == (
        f"error: --run closed/../run cannot be reached: this user may not open {closed} on its way; make it readable "
        f"(chmod u+rx {closed}), or copy the run where this user may\n")
    assert done[1].returncode == 2 and done[1].stderr == (
        f"error: --out closed/a/hf cannot be reached: this user may not open {closed} on its way; make it readable "
        f"(chmod u+rx {closed}), or choose another --out\n")


@pytest.mark.parametrize("target", ["config", "run_config", "probe"])
def test_a_file_this_user_may_not_read_is_one_line(run_dir, text_run_dir, tmp_path, capsys, monkeypatch, target):
    """#27 pass 18, as a user other than root (chmod 000): an unreadable --config, run config.yaml or --probe was a
    PermissionError traceback."""
    import errno
    from pathlib import Path

    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"prompt": "a", "answer": "b"}\n')
    path, argv = {"config": (tmp_path / "c.yaml", ["train", "-c", str(tmp_path / "c.yaml")]),
                  "run_config": (run_dir / "config.yaml", ["eval", "--run", str(run_dir)]),
                  "probe": (probe, ["eval", "--run", str(text_run_dir), "--probe", str(probe)])}[target]
    path.touch()

    def denied(read):
        def reader(self, *a, **k):
            if Path(self) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return read(self, *a, **k)
        return reader

    monkeypatch.setattr(Path, "read_text", denied(Path.read_text))
    monkeypatch.setattr(Path, "read_bytes", denied(Path.read_bytes))
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {path}: Permission denied for this user; make it "
                                                        f"readable (and writable, where the command writes), or copy "
                                                        f"it where this user may")


DOCUMENTED_RUNS = {"runs/quickstart": "run_dir", "runs/text_bytes": "text_run_dir"}


def _documented_exit_commands() -> list[str]:
    """Every `loopformer ... --exit` line of README.md and docs/ on a run the fixtures stand in for."""
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("loopformer ") and "--exit" in line and any(r + " " in line for r in DOCUMENTED_RUNS):
                lines.append(line)
    return sorted(set(lines))


@pytest.mark.parametrize("line", _documented_exit_commands())
def test_documented_exit_commands_run_as_written(line, request, capsys):
    """#27 pass 21: the docs' exit examples run as written (a sweep giving --exit twice for one circuit and a kl
    exit in generate's default cached decoding were refused: each now says what works)."""
    argv = shlex.split(line)[1:]
    for name, fixture in DOCUMENTED_RUNS.items():
        argv = [str(request.getfixturevalue(fixture)) if a == name else a for a in argv]
    small = ["--max-new-tokens", "2"] if argv[0] == "generate" else ["--examples", "8"]
    assert main([*argv, *small]) == 0, capsys.readouterr().err


def _config_header_commands() -> list[str]:
    """Every `loopformer ...` command in a shipped config's comments (in backquotes or alone on a line) on a run the
    fixtures stand in for."""
    lines = []
    for config in sorted((ROOT / "configs").rglob("*.yaml")):
        comments = " ".join(line.lstrip()[1:] for line in config.read_text().splitlines() if line.lstrip().startswith("#"))
        spans = re.findall(r"`(loopformer [^`]+)`", comments) or re.findall(r"(loopformer [^`#]+)", comments)
        for span in spans:
            for command in span.split(" && "):
                if any(r + " " in command + " " for r in DOCUMENTED_RUNS):
                    lines.append(command.strip())
    return sorted(set(lines))


@pytest.mark.parametrize("line", _config_header_commands())
def test_config_header_commands_run_as_written(line, request, capsys):
    """#27 pass 39: configs/text_bytes.yaml's header said `loopformer sweep --run runs/text_bytes`, which is refused
    (sweep needs --loops or --exit): the header's commands run as written."""
    argv = shlex.split(line)[1:]
    for name, fixture in DOCUMENTED_RUNS.items():
        argv = [str(request.getfixturevalue(fixture)) if a == name else a for a in argv]
    small = ["--max-new-tokens", "2"] if argv[0] == "generate" else ["--examples", "8"]
    assert main([*argv, *small]) == 0, capsys.readouterr().err


def test_a_deleted_current_directory_is_one_line(tmp_path, monkeypatch, capsys):
    """A relative path under a folder deleted after the shell entered it (`cd x; rm -r ../x`): Python cannot resolve
    it (os.getcwd), which was a FileNotFoundError traceback from pathlib (`train`'s default run.dir `runs`) or
    posixpath (`eval --run ../r`)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    (tmp_path / "r").mkdir()  # found (`..` of the deleted folder still leads up), then resolved: the traceback
    (tmp_path / "r" / "config.yaml").write_text(tiny_config(tmp_path).to_yaml())
    monkeypatch.chdir(gone)
    gone.rmdir()
    for argv in (["eval", "--run", "../r"], ["train", "-c", str(ROOT / "configs" / "quickstart.yaml")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: the current directory no longer exists") and "Traceback" not in err


def test_generate_on_an_act_circuit_says_its_count_is_a_cap(tmp_path, capsys):
    """#27 pass 27: generate's answers on an ACT circuit were labelled "X=3" (its count) where ACT's head stops each
    token earlier, as activity, ablate and sweep said "at loops X=3": the header says the counts are caps."""
    run = make_run(tiny_config(tmp_path, "act", "model.stages.0.circuits.X.halting={kind: act}",
                               "model.stages.0.circuits.X.backprop=3"))
    assert main(["generate", "--run", str(run), "--count", "1"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.endswith(" · ACT halts X's tokens by its head: the counts are caps"), head
