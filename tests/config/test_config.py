"""Config loading, overrides and the documented one-line errors."""

import os
import re

import pytest
import yaml

from loopformer.config import (
    ARCHITECTURE,
    BEHAVIOUR,
    SCHEDULE,
    SETTING,
    TASK,
    Config,
    LoopSchedule,
    circuit_label,
    config_changes,
    load_config,
    part_of,
)
from loopformer.errors import ConfigError
from tests.conftest import TASK_DEFAULTS

QUICKSTART = "configs/quickstart.yaml"


def test_quickstart_loads_and_round_trips(tmp_path):
    cfg = load_config(QUICKSTART)
    assert cfg.run.name == "quickstart" and cfg.model.d_model == 96
    circuits = cfg.to_dict()["model"]["stages"][0]["circuits"]
    assert all({"name", "depth", "width"} <= set(c) for c in circuits)
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_overrides_by_path_index_and_circuit_name():
    cfg = load_config(QUICKSTART, ["train.steps=7", "model.stages.0.circuits.Y.eval_loops=9",
                                   "model.stages.0.circuits.0.loops=poisson_lognormal(8, 0.5)",
                                   "data.eval_splits={a: [2, 3]}", "run.dir=/tmp/x"])
    assert cfg.train.steps == 7
    assert cfg.model.stages[0].circuits[1].eval_loops == 9
    assert str(cfg.model.stages[0].circuits[0].distribution()) == "poisson_lognormal(8, 0.5)"
    assert cfg.data.eval_splits == {"a": [2, 3]}
    assert str(cfg.run_dir) == "/tmp/x/quickstart"


def test_defaults_are_valid(tmp_path):
    """No --config trains the defaults: they pass validation unchanged, round-trip through YAML, and are
    one full-width circuit X looped 4 times between one prelude and one coda layer."""
    cfg = load_config(None)
    assert cfg == Config()
    (x,) = cfg.model.circuits()
    assert (cfg.model.d_model, cfg.model.heads, cfg.model.prelude, cfg.model.coda) == (64, 4, 1, 1)
    assert (x.name, x.width, str(x.distribution()), x.eval_loops, x.backprop) == ("X", 64, "fixed(4)", 4, 4)
    assert (cfg.train.steps, cfg.train.lr, cfg.data.batch_size, str(cfg.run_dir)) == (1000, 1e-3, 64, "runs/run")
    path = tmp_path / "defaults.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_integer_loops_mean_fixed():
    cfg = load_config(QUICKSTART, ["model.stages.0.circuits.X.loops=5"])
    assert str(cfg.model.stages[0].circuits[0].distribution()) == "fixed(5)"


BAD = [
    (["train.stepz=3"], r"unknown config key 'train.stepz': did you mean 'steps'\?"),
    (["model.d_model=abc"], r"model.d_model: expected int, got 'abc'"),
    (["train.steps"], r"malformed override 'train.steps': write key=value"),
    (["=3"], r"malformed override"),
    (["model.heads=5"], r"model.d_model \(96\) must be divisible by model.heads \(5\)"),
    (["model.stages.0.circuits.X.heads=3"], r"circuits.X.width \(64\) must be divisible by .*heads \(3\)"),
    (["model.stages.0.circuits.X.width=16"], r"slice circuit widths 16 \+ 32 = 48 must sum to model.d_model = 96"),
    (["model.stages.0.circuits.X.backprop=0"], r"circuits.X.backprop \(truncation depth k\) must be in 1..10000, got 0"),
    (["model.stages.0.circuits.X.window=-1"], r"circuits.X.window must be 0 \(full attention\) or 1..2,147,483,647 tokens"),
    (["model.window=-2"], r"model.window must be 0"),
    (["eval.sweep_circuits=[Z]"], r"eval.sweep_circuits: 'Z' is not a circuit; circuits are X, Y"),
    # #27 pass 41: a window past the iterations that run (a 126 GB out-of-memory traceback on a routed stage)
    (["train.iteration_loss=30", "model.stages.0.circuits.X.backprop=40"],
     r"^train.iteration_loss=30: circuit X runs at most 20 iterations \(model.stages.0.circuits.X.max_loops\), so a "
     r"window past them reads nothing more, and keeps the logits after each of its 30; use train.iteration_loss<=20$"),
    # #27 pass 41: two circuits whose names read the same (another Unicode form) were two circuits
    (["model.stages.0.circuits.0.name=\uff38", "model.stages.0.circuits.1.name=X"],
     r"circuits.X.name: circuit name 'X' reads as circuit \uff38's \(the same letters in another Unicode form\)"),
    # #27 pass 41: numbers float32 (training's precision) rounds to a refused value: lr 0 trained nothing, b2 1 made
    # each step 10,000 times too small, a clip of 0 zeroed every gradient, init_std 0 was a model of zeros
    (["train.lr=1e-320"], r"^train.lr=1e-320 is 0 in float32, the precision training computes in, where train.lr "
                          r"cannot be 0; give a value float32 holds, e.g. train.lr=0.001$"),
    (["train.lr=1e308"], r"^train.lr=1e\+308 is inf in float32"),
    (["train.b2=0.9999999999999999"], r"^train.b2=0.9999999999999999 is 1 in float32, .*e.g. train.b2=0.95$"),
    (["train.grad_clip=5e-324"], r"^train.grad_clip=5e-324 is 0 in float32"),
    (["model.init_std=5e-324"], r"^model.init_std=5e-324 is 0 in float32"),
    (["model.norm_eps=1e-50"], r"^model.norm_eps=1e-50 is 0 in float32"),
    (["model.stages.0.circuits.X.loops=uniform(8, 2)"], r"circuits.X.loops: uniform\(a, b\) needs"),
    (["model.stages.0.circuits.X.loops=many"], r"circuits.X.loops: 'many' is not a loop distribution"),
    (["model.stages.0.circuits.X.inject=mul"], r"circuits.X.inject: 'mul' is not one of add, concat, none"),
    (["model.stages.0.circuits.X.read=project"], r"unknown config key 'model.stages.0.circuits.0.read': .*io"),
    (["model.stages.0.circuits.X.io=proj"], r"circuits.X.io: 'proj' is not one of slice, project"),
    (["data.tokenizer=gpt2"], r"data.tokenizer: 'gpt2' is not bytes, bpe or a path to a tokenizer.json"),
    (["run.name=.."], r"run.name must be a plain directory name, got '..'"),
    (["model.stages.0.circuits.Y.name=X"], r"circuit name 'X' is used twice"),
    (["model.stages.0.circuits.Z.depth=2"], r"'model.stages.0.circuits.Z' is not an index 0..1 or a name in \['X', 'Y'\]"),
    (["data.train_difficulty=[3, 1]"], r"data.train_difficulty: expected \[lo, hi\] with 1 <= lo <= hi"),
    (["data.batch_size=10", "train.grad_accum=3"], r"data.batch_size \(10\) must be divisible by train.grad_accum \(3\)"),
    (["model.compute_dtype=fp8"], r"model.compute_dtype: 'fp8' is not one of float32, bfloat16"),
    (["mesh.data=0"], r"mesh.data must be >= 1 or -1"),
    (["train.eval_every=-1"], r"train.eval_every must be >= 0 \(0: no evaluation while training\), got -1"),
    (["model.stages=[{circuits: []}]"], r"model.stages.0.circuits: a stage needs at least one circuit"),
    # issue #17 (more in tests/bad_inputs/): a cap below the training draws, zero counts named as such
    (["model.stages.0.circuits.X.loops=uniform(8, 16)", "model.stages.0.circuits.X.max_loops=4"],
     r"circuits.X.max_loops=4 is below counts that loops=uniform\(8, 16\) "
     r"draws \(up to 16\): they would be clamped to 4, silently changing the training distribution"),
    (["model.stages.0.circuits.X.max_loops=10"], r"^model.stages.0.circuits.X.loops=per_difficulty\(2, 4\) gives 20 loops "
     r"at difficulty 8 \(the training range's hi\), above max_loops=10; raise max_loops to >= 20$"),
    (["train.grad_accum=0"], r"^train.grad_accum must be >= 1, got 0$"),
    (["model.heads=0"], r"^model.heads must be >= 1, got 0$"),
    (["run.name=a/.."], r"run.name must be a plain directory name, got 'a/..'"),
    # #27 pass 10: a tab kept the value as text, refused without saying why
    (["train.steps=\t5"], r"^train.steps: expected int, got '\\t5' \(it holds a tab, which YAML does not read as a "
     r"space: write spaces\)$"),
    (["data.eval_splits={a:\t[1, 2]}"], r"^data.eval_splits: expected a mapping, got .* \(it holds a tab"),
    # #27 pass 37: YAML folds a line break into a space: run.name=$'a\nb' trained into runs/'a b' with no word
    (["run.name=a\nb"], r"^override value 'a\\nb' holds a line break, which YAML reads as a space \('a b'\); write "
     r"the value on one line$"),
    (["data.paths=[x, y\n z]"], r"holds a line break, which YAML reads as a space \('y z'\)"),
    # #27 pass 11: a name past the filesystem's limits was a traceback ("File name too long") at the first file
    (["run.name=" + "n" * 256], r"^run.name / run.dir: the name n{24}\.\.\. is 256 bytes, and a name can be at most 255 "
     r"here; choose a shorter one$"),
    (["run.dir=/" + "/".join(["d" * 200] * 20)], r"^run.name / run.dir: the path is [0-9,]+ bytes, and the files "
     r"written in it need it under 3,840"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_gives_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(QUICKSTART, overrides)
    assert "\n" not in str(info.value)


def test_run_dir_reads_a_tilde_as_the_home_directory():
    """#27 pass 11: run.dir=~/runs (a YAML value keeps ~ literal) made a folder named ~ in the current directory, then
    the checkpoint library (which expands it) failed as a traceback: both now read the home directory."""
    from pathlib import Path
    cfg = load_config(QUICKSTART, ["run.dir=~/runs", "run.name=qs"])
    assert cfg.run_dir == Path.home() / "runs" / "qs"


def test_an_override_nested_too_deeply_is_one_line():
    """#27 pass 24: an override value of 3,000 '[' was a RecursionError traceback from PyYAML's composer."""
    with pytest.raises(ConfigError, match=r"^override value '\[\[\[.*…' \(3,002 characters\): its lists or mappings "
                                          r"are nested inside each other too deeply to read \(a config nests a few "
                                          r"levels\); write it flat$"):
        load_config(None, ["seed=" + "[" * 3000])


def test_a_blank_override_value_is_kept_as_given():
    """#27 pass 10: a value of only whitespace was read as "", so data.doc_separator=<tab> kept each file whole."""
    assert load_config("configs/text_bytes.yaml", ["data.doc_separator=\t"]).data.doc_separator == "\t"


# a date (#27 pass 41): "run.name: expected str, got datetime.date(2024, 1, 1)"
@pytest.mark.parametrize("text", ["010", "0x1F", "12:30:00", "1_000", "+5", "1.50", ".inf", "2024-01-01",
                                  "2024-01-01T10:00:00"])
def test_a_name_written_as_an_odd_number_is_kept_as_written(tmp_path, text):
    """#27 pass 14: YAML 1.1 reads 010 as 8, 12:30:00 as 45000 and 1_000 as 1000, so run.name=010 trained into runs/8
    (and a split named 010 was "8"); a string field now keeps the text, a number field the number."""
    cfg = load_config(QUICKSTART, [f"run.name={text}", f"data.eval_splits={{{text}: [1, 2]}}"])
    assert cfg.run.name == text and list(cfg.data.eval_splits) == [text]
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{name: {text}}}\nseed: 0x10\ntrain: {{steps: +5}}\neval: {{sweep_loops: [0b11, 12]}}\n")
    cfg = load_config(path)
    assert (cfg.run.name, cfg.seed, cfg.train.steps, cfg.eval.sweep_loops) == (text, 16, 5, [3, 12])
    assert load_config(path, ["data.task_args={width: 0x10}"]).data.task_args == {"width": 16}
    assert yaml.safe_load(cfg.to_yaml())["run"]["name"] == text  # saved quoted: the run reads back its own name


@pytest.mark.parametrize("setting, message", [
    ("train.steps=1_0", r"^train.steps: '1_0' is written with '_'; write the number's digits alone"),
    ("eval.sweep_loops=[2, 010]", r"^eval.sweep_loops.1: '010' starts with 0, which YAML reads as an octal number "
                                  r"\(8\); write it without the leading 0$"),
    ("train.steps=1:20", r"^train.steps: '1:20' reads in YAML as a base-60 number \(80\); write the number itself$"),
    ("train.lr=1e-0_3", r"^train.lr: '0_3' is written with '_'"),
    ("train.lr=\u0663e-3", r"^train.lr: '\u0663' is a digit of another script \(U\+0663\)"),
    ("data.task_args={rows: 0_3}", r"^data.task_args.rows: '0_3' is written with '_'"),
])
def test_a_number_setting_in_a_form_yaml_reads_as_another_number_is_refused(setting, message):
    """#27 pass 42: a number setting read YAML 1.1's forms, so train.steps=1_0 trained 10 steps (where fixed(1_0) and
    --examples 1_0 are refused), 010 was 8, 1:20 was 80; a float setting read '1e-0_3' and a digit of another script
    with float(); hexadecimal, a sign and trailing zeros still read as written (above)."""
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [setting])


@pytest.mark.parametrize("text, word", [("yes", "true"), ("off", "false"), ("~", "null")])
def test_a_name_that_yaml_reads_as_a_value_says_to_quote_it(text, word):
    """#27 pass 41: `run.name=yes` was "run.name: expected str, got True", with no word of the fix."""
    with pytest.raises(ConfigError, match=rf"^run.name: expected text, got {word}, which YAML reads as a value .*; "
                                          rf"quote it to use it as text, e.g. run.name='\"{word}\"'$"):
        load_config(QUICKSTART, [f"run.name={text}"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist; pass --config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="^config file '' does not exist; "):  # -c "": it named '.'
        load_config("")
    fifo = tmp_path / "fifo.yaml"  # #27 pass 12: a directory or a FIFO was "not found" (it is there)
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"^config file .*fifo.yaml is a pipe or a device; pass --config"):
        load_config(fifo)
    with pytest.raises(ConfigError, match=r"^config file .* is a folder; pass --config with a path to a YAML file"):
        load_config(tmp_path)
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")  # #27 pass 17: "not found" (it is there)
    with pytest.raises(ConfigError, match=r"^config file .*loop.yaml is a symlink that leads nowhere \(or in a loop\)"):
        load_config(tmp_path / "loop.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(empty)
    top = tmp_path / "list.yaml"
    top.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


@pytest.mark.parametrize("task,ok", [("addition", False), ("pointer_chase", False), ("prefix_parity", True),
                                     ("maze", True), ("text", False)])
def test_bidirectional_needs_aligned_labels(task, ok):
    """model.causal=false would let a next-token model read its targets: refused, naming the field."""
    from loopformer.data.sources import build_data

    extra = (["data.paths=['asset:kjv_genesis_exodus.txt']", "model.stages.0.circuits.X.loops=uniform(8, 16)",
              *TASK_DEFAULTS] if task == "text" else [])  # text has no difficulty (per_difficulty loops, splits)
    cfg = load_config(QUICKSTART, ["model.causal=false", f"data.task={task}", *extra])
    if ok:
        assert build_data(cfg).task.labels_aligned
    else:
        with pytest.raises(ConfigError, match=r"model.causal=false .*set model.causal=true") as info:
            build_data(cfg)
        assert "\n" not in str(info.value)


def test_a_plain_transformer_has_no_stages():
    cfg = load_config(QUICKSTART, ["model.stages=[]", "eval.sweep_circuits=[]", "train.iteration_loss=0"])
    assert cfg.model.circuits() == [] and cfg.model.schedules() == {}


def test_circuit_settings_fall_in_three_parts():
    c = load_config(QUICKSTART).model.circuit("X")
    assert c.schedule() == LoopSchedule(loops="per_difficulty(2, 4)", max_loops=20, eval_loops=20, backprop=4)
    assert part_of("model.stages.0.circuits.X.width") == ARCHITECTURE
    assert part_of("model.stages.0.circuits.X.window") == BEHAVIOUR
    assert part_of("model.stages.0.circuits.X.backprop") == SCHEDULE
    assert part_of("model.d_model") == part_of("model.norm") == ARCHITECTURE
    assert part_of("model.compute_dtype") == part_of("model.causal") == BEHAVIOUR
    assert part_of("data.task_args.rows") == part_of("data.tokenizer") == TASK
    assert part_of("train.lr") == part_of("data.train_difficulty") == part_of("seed") == SETTING


def test_config_changes_name_circuits_and_parts():
    old = load_config(QUICKSTART).to_dict()
    new = load_config(QUICKSTART, ["model.stages.0.circuits.X.loops=per_difficulty(2, 2)", "train.steps=4000",
                                   "model.stages.0.circuits.Y.width=16", "model.stages.0.circuits.X.width=80"]).to_dict()
    changes = config_changes(old, new)
    assert [(c.path, c.part) for c in changes] == [
        ("model.stages.0.circuits.X.width", ARCHITECTURE), ("model.stages.0.circuits.X.loops", SCHEDULE),
        ("model.stages.0.circuits.Y.width", ARCHITECTURE), ("train.steps", SETTING)]
    assert changes[1].old == "per_difficulty(2, 4)" and changes[1].new == "per_difficulty(2, 2)"
    assert circuit_label(changes[1].path) == "loops of X"
    assert config_changes(old, old) == []
    fewer = load_config(QUICKSTART, ["model.stages.0.circuits=[{name: X, width: 96, heads: 4}]",
                                     "eval.sweep_circuits=[]"]).to_dict()
    assert [(c.path, c.part) for c in config_changes(old, fewer)][0] == ("model.stages.0.circuits", ARCHITECTURE)


def test_yaml_merge_keys_and_anchors(tmp_path):
    """A merge key (`<<: *base`) is valid YAML: its keys are defaults the mapping's own keys override,
    not keys given twice (it was "not valid YAML (could not determine a constructor ...)"; issue 27 pass 10)."""
    f = tmp_path / "merge.yaml"
    f.write_text("train:\n  steps: 2\nmodel:\n  d_model: 16\n  heads: 2\n  stages:\n    - circuits:\n"
                 "      - &c {name: X, depth: 1, width: 8, heads: 2, loops: 'fixed(2)', eval_loops: 2, backprop: 1}\n"
                 "      - <<: *c\n        name: Y\n        depth: 2\n")
    circuits = load_config(f).model.stages[0].circuits
    assert [(c.name, c.depth, c.width, c.loops) for c in circuits] == [("X", 1, 8, "fixed(2)"), ("Y", 2, 8, "fixed(2)")]
    f.write_text("train:\n  steps: 2\n  lr: 0.1\n  steps: 3\n")  # a key given twice is still refused
    with pytest.raises(ConfigError, match="key 'steps' is given twice"):
        load_config(f)


@pytest.mark.parametrize("override,shown", [
    ("train.steps=" + "x" * 3000, r"^train.steps: expected int, got 'x{79}…' \(3,002 characters\)$"),
    ("eval.sweep_loops=[" + "1," * 1500 + "]", r"^eval.sweep_loops lists 1 twice: \[1, 1, .{73}…\] \(4,500 "
                                                r"characters\); give each once$"),
    ("run.name=a/" + "z" * 3000, r"^run.name must be a plain directory name, got 'a/z{77}…' \(3,004 characters\)$"),
])
def test_a_long_refused_value_is_shown_by_its_start_and_length(override, shown):
    """#27 pass 24's leftover: an override whose value was refused quoted it whole, a line of 3,000 characters.
    Every LoopformerError's message cuts a word or a list past 500 characters (errors.shorten); shorter ones stay whole."""
    with pytest.raises(ConfigError) as info:
        load_config("configs/quickstart.yaml", [override])
    assert re.search(shown, str(info.value)) and len(str(info.value)) < 300, str(info.value)
    kept = "p" * 488  # the word run.name='...'; is 500 characters
    assert str(ConfigError(f"run.name={kept!r}; keep")) == f"run.name={kept!r}; keep"
    assert str(ConfigError(f"a {'q' * 501}.")) == f"a {'q' * 80}… (501 characters)."


@pytest.mark.parametrize("override", [b"run.name=r\xff", b"data.paths=[/x/d\xe9/c.txt]", b"run.dir=/tmp/\xc3"])
def test_an_override_that_is_not_utf8_is_named(override):
    """#27 pass 33: a command line's byte that is not UTF-8 (`run.name=$'r\\xff'`, a Latin-1 folder name) reached the
    run as a lone surrogate: training wrote the run's folder and config.yaml, then tensorboard's writer raised a
    UnicodeEncodeError traceback; in data.paths it was "expected a list". One line names the byte."""
    text = os.fsdecode(override)
    byte = next(f"\\x{b:02x}" for b in override if b >= 0x80)
    with pytest.raises(ConfigError, match=rf"^override '.*' holds the byte {re.escape(byte)}, which is not UTF-8 text"):
        load_config("configs/quickstart.yaml", [text])


@pytest.mark.parametrize("overrides, message", [
    # #27 pass 40's leftover: a negative index set the last stage, Python's way
    (["model.stages.-1.circuits.0.depth=3"], r"^override 'model.stages.-1.circuits.0.depth': 'model.stages.-1' is a "
                                             r"negative index; give 0..0$"),
    (["model.stages.0.circuits.\u0660.depth=3"], r"'model.stages.0.circuits.\u0660' is not an index 0..1 or a name"),
    # #27 pass 41: one field by two spellings (a name and an index, 0 and 00): the last one won with no word
    (["model.stages.0.circuits.X.eval_loops=3", "model.stages.0.circuits.0.eval_loops=5"],
     r"^model.stages.0.circuits.X.eval_loops and model.stages.0.circuits.0.eval_loops both set "
     r"model.stages.0.circuits.0.eval_loops; give it once \(the last one would win with no word\)$"),
    (["model.stages.0.circuits.0.depth=3", "model.stages.00.circuits.0.depth=4"], r"both set model.stages.0.circuits"),
    # ... or a whole list or section after an override inside it, which it dropped
    (["model.stages.0.circuits.X.eval_loops=3", "model.stages=[]"],
     r"^model.stages replaces all of model.stages, and with it what model.stages.0.circuits.X.eval_loops set before "
     r"it \(which would be lost with no word\); give model.stages.0.circuits.X.eval_loops after it, or drop one$"),
    (["train.steps=7", "train={lr: 0.1}"], r"^train replaces all of train, and with it what train.steps set"),
])
def test_two_overrides_of_one_field_by_other_spellings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides, once=True)


def test_an_override_inside_a_list_given_after_the_list_is_kept():
    cfg = load_config(QUICKSTART, ["data.eval_splits={a: [1, 2]}", "data.eval_splits.a=[1, 3]",
                                                             "model.stages.0.circuits.X.eval_loops=3",
                                                             "model.stages.0.circuits.Y.eval_loops=4"], once=True)
    assert cfg.data.eval_splits == {"a": [1, 3]} and [c.eval_loops for c in cfg.model.circuits()] == [3, 4]
