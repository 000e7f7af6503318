"""Typed run configuration: YAML files, ``a.b.c=value`` overrides, validation with clear errors.

Every mistake a user can make in a config (unknown key, wrong type, impossible shape) raises one
`ConfigError` whose message names the dotted field and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loopformer.errors import ConfigError
from loopformer.model.loop import LoopDistribution

READ_MODES = ("slice", "project")
WRITE_MODES = ("slice", "project")
INJECT_MODES = ("add", "concat", "none")
INIT_MODES = ("zeros", "input", "noise")
NORM_MODES = ("pre", "sandwich")
MLP_KINDS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")
TEXT_FORMATS = ("auto", "text", "jsonl", "arrayrecord")
TOKENIZERS = ("bytes", "bpe")


@dataclass
class CircuitConfig:
    """One looped circuit: a stack of ``depth`` blocks of width ``width`` run ``n`` times, tied."""

    name: str = "X"
    depth: int = 1
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    read: str = "slice"  # slice: its own columns of the stream | project: learned d_model -> width
    write: str = "slice"  # slice: back into those columns | project: learned width -> d_model
    inject: str = "add"  # input injection each iteration: add | concat | none
    init: str = "zeros"  # initial state: zeros | input | noise
    init_noise_std: float = 1.0
    loops: str = "fixed(4)"  # training loop-count distribution (see LoopDistribution)
    max_loops: int = 64  # cap on sampled training counts
    eval_loops: int = 4  # default count at evaluation
    backprop: int = 4  # truncation depth k: gradient flows through the last k iterations
    state_norm: bool = False  # RMS-normalise the state after every iteration (bounded; fixed points possible)
    window: int = 0  # attention span inside the circuit: 0 = full causal; w = each token sees itself and
    # the w - 1 tokens before it (a local step, like DeepThinking's convolutions: info travels w - 1
    # positions per block per iteration, so longer inputs need more loops)

    def distribution(self) -> LoopDistribution:
        return LoopDistribution.parse(self.loops, cap=self.max_loops)

    def shape_key(self) -> tuple:
        """Circuits with equal keys have identical parameter shapes and run batched (vmap)."""
        return (self.depth, self.width, self.heads, self.mlp_ratio, self.read, self.write, self.inject,
                self.init, self.init_noise_std, self.backprop, self.state_norm, self.window)


@dataclass
class StageConfig:
    """A parallel bank: its circuits read the same stream and their outputs are added (the ⊕)."""

    circuits: list[CircuitConfig] = field(default_factory=lambda: [CircuitConfig()])


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the data task
    d_model: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    mlp: str = "gelu"
    norm: str = "pre"  # pre | sandwich
    prelude: int = 1
    coda: int = 1
    window: int = 0  # attention span of prelude and coda blocks (0 = full causal; see CircuitConfig.window)
    causal: bool = True  # false: bidirectional attention everywhere (the window reaches w - 1 tokens both
    # ways); only for tasks whose labels sit at input positions (aligned), where no target is an input
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    compute_dtype: str = "float32"  # bfloat16: bf16 matmuls, fp32 parameters and logits

    def circuits(self) -> list[CircuitConfig]:
        return [c for s in self.stages for c in s.circuits]


@dataclass
class DataConfig:
    task: str = "pointer_chase"
    task_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # global batch (all processes, all accumulation steps)
    train_difficulty: list[int] = field(default_factory=lambda: [1, 4])  # [lo, hi] inclusive
    eval_splits: dict[str, list[int]] = field(default_factory=lambda: {"train": [1, 4]})
    eval_examples: int = 512
    eval_batch_size: int = 256
    eval_loops: list[int] = field(default_factory=list)  # also eval with every circuit at each count (logged
    # as eval/<split>/loops_<n>/<metric>), to see during training whether the model uses its loops
    # --- text corpora (task: text); train_difficulty / eval_splits apply to synthetic tasks only.
    # A text run's eval splits are val (held-out documents) and train (its first windows).
    paths: list[str] = field(default_factory=list)  # files, globs, directories; "asset:NAME" = a shipped text;
    # or one directory written by `loopformer prepare` (ArrayRecord shards)
    format: str = "auto"  # auto (by extension) | text | jsonl | arrayrecord
    text_field: str = "text"  # JSONL: the key that holds a document's text
    doc_separator: str = ""  # split plain-text files into documents at this string ("" = one per file)
    tokenizer: str = "bytes"  # bytes | bpe (byte-level BPE trained on the training split, saved with the run)
    vocab_size: int = 1024  # bpe: vocabulary size including 3 specials and 256 bytes
    seq_len: int = 256  # tokens per packed training window
    val_fraction: float = 0.05  # share of documents held out for validation (chosen by a hash of the text)


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    log_every: int = 50
    eval_every: int = 500  # steps between evaluations (and one at the end); 0: none while training
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True


@dataclass
class EvalConfig:
    sweep_loops: list[int] = field(default_factory=list)  # loop counts shown at the end of training
    sweep_circuits: list[str] = field(default_factory=list)  # circuits set to each count (others stay at
    # their eval_loops); empty = every circuit
    diagnostics: bool = True  # per-circuit state statistics at each eval


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str = "run"


@dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check/convert one YAML value against a type annotation."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                              f"got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} is not {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, item, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{path}': {hint}valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a nested dict/list tree; a list of named items may be indexed by name
    (``model.stages.0.circuits.X.eval_loops=16``)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            names = [item.get("name") for item in node if isinstance(item, dict)]
            if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                idx = int(part)
            elif part in names:
                idx = names.index(part)
            else:
                raise ConfigError(f"override '{dotted}': '{where}' is not an index 0..{len(node) - 1}"
                                  + (f" or a name in {names}" if any(names) else ""))
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i])}' is a value, not a mapping")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            raise ConfigError(f"malformed override '{item}': write key=value, e.g. train.steps=200")
        out.append((key.strip(), _parse_value(text)))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then validate."""
    data: dict[str, Any] = Config().to_dict()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (pass --config with a path to a YAML file, "
                              f"e.g. configs/quickstart.yaml)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run, model, data, train, ...)")
        data = _merge(data, loaded or {})
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    return config_from_dict(data)


def _merge(base: Any, new: Any) -> Any:
    """Deep-merge mappings; lists and scalars in ``new`` replace those in ``base``."""
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for k, v in new.items():
            out[k] = _merge(base[k], v) if k in base and k not in ("task_args", "eval_splits") else v
        return out
    return new


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(value: str, options: tuple[str, ...], path: str) -> None:
    _check(value in options, f"{path}: '{value}' is not one of {', '.join(options)}")


def validate(cfg: Config) -> None:
    """Raise ConfigError on the first impossible setting."""
    m = cfg.model
    _check(m.d_model >= 2, f"model.d_model must be >= 2, got {m.d_model}")
    _check(m.heads >= 1 and m.d_model % m.heads == 0,
           f"model.d_model ({m.d_model}) must be divisible by model.heads ({m.heads})")
    _check((m.d_model // m.heads) % 2 == 0,
           f"model.d_model / model.heads = {m.d_model // m.heads} must be even (RoPE rotates pairs)")
    _check(m.prelude >= 0 and m.coda >= 0, "model.prelude and model.coda must be >= 0")
    _check(m.vocab_size >= 0, "model.vocab_size must be >= 0 (0 takes it from the task)")
    _check(m.mlp_ratio > 0, "model.mlp_ratio must be > 0")
    _check(m.window >= 0, f"model.window must be 0 (full causal attention) or >= 1 tokens, got {m.window}")
    _one_of(m.norm, NORM_MODES, "model.norm")
    _one_of(m.mlp, MLP_KINDS, "model.mlp")
    _one_of(m.compute_dtype, DTYPES, "model.compute_dtype")
    _check(len(m.stages) >= 1, "model.stages: need at least one stage with at least one circuit")
    seen: set[str] = set()
    for s, stage in enumerate(m.stages):
        _check(len(stage.circuits) >= 1, f"model.stages.{s}.circuits: a stage needs at least one circuit")
        slice_width = 0
        for c in stage.circuits:
            p = f"model.stages.{s}.circuits.{c.name}"
            _check(c.name.isidentifier(), f"{p}.name: '{c.name}' must be an identifier (letters, digits, _)")
            _check(c.name not in seen, f"{p}.name: circuit name '{c.name}' is used twice; names must be unique")
            seen.add(c.name)
            _check(c.depth >= 1, f"{p}.depth must be >= 1, got {c.depth}")
            _check(c.width >= 2, f"{p}.width must be >= 2, got {c.width}")
            _check(c.heads >= 1 and c.width % c.heads == 0,
                   f"{p}.width ({c.width}) must be divisible by {p}.heads ({c.heads})")
            _check((c.width // c.heads) % 2 == 0,
                   f"{p}: width / heads = {c.width // c.heads} must be even (RoPE rotates pairs)")
            _check(c.mlp_ratio > 0, f"{p}.mlp_ratio must be > 0")
            _one_of(c.read, READ_MODES, f"{p}.read")
            _one_of(c.write, WRITE_MODES, f"{p}.write")
            _one_of(c.inject, INJECT_MODES, f"{p}.inject")
            _one_of(c.init, INIT_MODES, f"{p}.init")
            _check(c.backprop >= 1, f"{p}.backprop (truncation depth k) must be >= 1, got {c.backprop}")
            _check(c.eval_loops >= 1, f"{p}.eval_loops must be >= 1, got {c.eval_loops}")
            _check(c.max_loops >= 1, f"{p}.max_loops must be >= 1, got {c.max_loops}")
            _check(c.window >= 0, f"{p}.window must be 0 (full causal attention) or >= 1 tokens, got {c.window}")
            try:
                c.distribution()
            except ValueError as e:
                raise ConfigError(f"{p}.loops: {e}") from None
            _check((c.read == "slice") == (c.write == "slice"),
                   f"{p}: read and write must both be 'slice' or both 'project' (got read={c.read}, write={c.write})")
            if c.read == "slice":
                slice_width += c.width
        all_slice = all(c.read == "slice" for c in stage.circuits)
        widths = " + ".join(str(c.width) for c in stage.circuits if c.read == "slice")
        if all_slice:
            _check(slice_width == m.d_model,
                   f"model.stages.{s}: slice circuit widths {widths} = {slice_width} must sum to "
                   f"model.d_model = {m.d_model} (or use read/write: project)")
        else:
            _check(slice_width <= m.d_model,
                   f"model.stages.{s}: slice circuit widths {widths} = {slice_width} exceed model.d_model = {m.d_model}")
    d = cfg.data
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(d.eval_examples >= 1 and d.eval_batch_size >= 1, "data.eval_examples and data.eval_batch_size must be >= 1")
    for key, rng in [("data.train_difficulty", d.train_difficulty)] + [
            (f"data.eval_splits.{k}", v) for k, v in d.eval_splits.items()]:
        _check(len(rng) == 2 and 1 <= rng[0] <= rng[1], f"{key}: expected [lo, hi] with 1 <= lo <= hi, got {rng}")
    _check(len(d.eval_splits) >= 1, "data.eval_splits: name at least one split, e.g. {train: [1, 4]}")
    _check(all(n >= 1 for n in d.eval_loops), f"data.eval_loops: counts must be >= 1, got {d.eval_loops}")
    _one_of(d.format, TEXT_FORMATS, "data.format")
    _one_of(d.tokenizer, TOKENIZERS, "data.tokenizer")
    _check(d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}")
    _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if d.task == "text":
        _check(len(d.paths) >= 1, "data.paths: name the corpus for data.task=text, e.g. data.paths=['corpus/*.txt'] "
               "or data.paths=['asset:kjv_genesis_exodus.txt']")
        _check(d.tokenizer != "bpe" or d.vocab_size >= 260,
               f"data.vocab_size={d.vocab_size} is too small for data.tokenizer=bpe: it needs >= 260 "
               f"(3 specials + 256 bytes + merges)")
    t = cfg.train
    _check(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
    _check(t.grad_accum >= 1 and d.batch_size % t.grad_accum == 0,
           f"data.batch_size ({d.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _check(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0 (0: no evaluation while training), got {t.eval_every}")
    _check(t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
    _check(all(n >= 1 for n in cfg.eval.sweep_loops), f"eval.sweep_loops: counts must be >= 1, got {cfg.eval.sweep_loops}")
    names = [c.name for c in cfg.model.circuits()]
    for name in cfg.eval.sweep_circuits:
        _check(name in names, f"eval.sweep_circuits: '{name}' is not a circuit; circuits are {', '.join(names)}")
    for key in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, key)
        _check(v == -1 or v >= 1, f"mesh.{key} must be >= 1 or -1 (fill), got {v}")
    _check(cfg.run.name != "" and "/" not in cfg.run.name, f"run.name must be a plain directory name, got '{cfg.run.name}'")
