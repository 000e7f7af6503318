"""The typed run configuration, in sections that each validate themselves.

A circuit is written in YAML as one entry, but its settings fall in three parts, and the trainer
treats them differently when a run is resumed:

- **architecture** (`CircuitArch`, and the model fields marked ``ARCH``): the weights depend on these
  (their paths and shapes); a resume must keep them.
- **loop schedule** (`LoopSchedule`): how often a circuit runs in training and evaluation; no weight
  depends on it, so it may change on resume (a loop curriculum), and the change is logged.
- **behaviour** (`CircuitBehaviour`, the other model fields): how the weights are used (attention
  window, initial state, dtype); it may change on resume too, also logged.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loopformer.errors import ConfigError, escaped, hidden_char, holds, lookalike, not_utf8, printable
from loopformer.runs.layout import too_long
from loopformer.variants.halting import HALTINGS, Halting
from loopformer.variants.loops import MAX_LOOPS, LoopDistribution
from loopformer.variants.position import POSITIONS, RopeScaling
from loopformer.variants.registry import Registry
from loopformer.variants.routing import ROUTERS, RouterKind
from loopformer.variants.state import INITS, INJECTIONS

IO_MODES = ("slice", "project")
NORM_MODES = ("pre", "sandwich")
MLP_KINDS = ("gelu", "swiglu")
OUTPUT_MODES = ("residual", "replace")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "einsum", "cudnn")
TEXT_FORMATS = ("auto", "text", "jsonl", "arrayrecord")
TOKENIZER_KINDS = ("bytes", "bpe")  # or a path to a tokenizer.json
PROMPT_FORMATS = ("documents", "tokenizer")
TRAIN_STAGES = ("all", "gate")

ARCHITECTURE, SCHEDULE, BEHAVIOUR = "architecture", "schedule", "behaviour"


def _arch(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A model field that weight shapes depend on."""
    return field(default=default, metadata={"part": ARCHITECTURE}, **kw)


def mlp_hidden(width: int, ratio: float) -> int:
    """Hidden units of a block's MLP: round(ratio * width), at least 1."""
    return max(1, int(round(ratio * width)))


MAX_EVAL_EXAMPLES = 100_000  # examples per eval split (data.eval_examples, --examples): built in memory first
# Past these a setting is surely a typo (a 20-digit number), and it would not fail cleanly: a layer count builds
# one layer at a time (hours before memory is checked), sizes overflow JAX's random bits (a traceback), and a
# window is compared inside jitted code as a 32-bit integer (an overflow traceback after the run was written).
MAX_LAYERS = 10_000  # model.prelude, model.coda, a circuit's depth
MAX_WIDTH = 2**20  # model.d_model, a circuit's width, the vocabulary
MAX_HIDDEN = 2**24  # an MLP's hidden units (mlp_ratio x width)
MAX_WINDOW = 2**31 - 1  # an attention window, in tokens
MAX_STEPS = 2**31 - 1  # training steps and step intervals: the step counter is int32 (and at 1 ms a step, 25 days)
MAX_NOISE_STD = 1e3  # a circuit's init_noise_std: a state of that size is already far past any trained one
F32_MAX = 3.4028234663852886e38  # the largest float32: a setting above it is inf inside JAX (a NaN loss at step 1)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(value: str, options: tuple[str, ...] | Registry, path: str) -> None:
    names = options.names() if isinstance(options, Registry) else options
    _check(value in names, f"{path}: '{value}' is not one of {', '.join(names)}{lookalike(value, names)}")


# ----------------------------------------------------------------------------- circuits

def _check_mlp_and_window(block: Any, prefix: str) -> None:
    """The MLP width and attention window of the model's plain layers or of a circuit (``prefix``)."""
    _check(0 < block.mlp_ratio < math.inf, f"{prefix}.mlp_ratio must be a finite number > 0, got {block.mlp_ratio}")
    _check(block.mlp_hidden <= MAX_HIDDEN, f"{prefix}.mlp_ratio={block.mlp_ratio:g} gives {block.mlp_hidden:,} hidden "
           f"units; at most {MAX_HIDDEN:,}")
    _check(0 <= block.window <= MAX_WINDOW, f"{prefix}.window must be 0 (full attention) or 1..{MAX_WINDOW:,} tokens, "
           f"got {block.window}")


def _check_once(items: list, key: str) -> None:
    """ConfigError when a list of counts or names holds one twice (it would be run and reported twice)."""
    twice = next((x for i, x in enumerate(items) if x in items[:i]), None)
    _check(twice is None, f"{key} lists {twice!r} twice: {items}; give each once")


def _changed(cfg: Any, names: Iterable[str]) -> str | None:
    """The first of ``names`` whose value in ``cfg`` (a config dataclass) differs from its default: a setting that was
    given, which the caller has found nothing would read."""
    defaults = type(cfg)()
    return next((n for n in names if getattr(cfg, n) != getattr(defaults, n)), None)


def _check_f32(value: float, key: str) -> None:
    """ConfigError for a finite ``value`` that float32 cannot hold: JAX reads it as inf (a NaN loss at step 1,
    blamed on train.lr)."""
    _check(not F32_MAX < abs(value) < math.inf, f"{key}={value:g} is past float32's largest number ({F32_MAX:.3g}) "
           f"and would be inf in training; lower it")


def _check_range(value: float, key: str, ok: Any, message: str, example: float) -> None:
    """ConfigError ``message`` unless ``ok(value)``, and (`_check_in_f32`) unless ``ok`` holds for it in float32 too:
    one range, stated once, for the value given and the value trained with."""
    _check(ok(value), message)
    _check_in_f32(value, key, ok, example)


def _check_in_f32(value: float, key: str, ok: Any, example: float) -> None:
    """ConfigError for a ``value`` that ``ok`` accepts and that float32, the precision training computes in, rounds to
    one it refuses: `train.lr=1e-320` is 0 (it trained nothing), `train.b2=0.9999999999999999` is 1 (the step was
    10,000 times too small), `model.init_std=5e-324` is 0 (a model of zeros), `train.grad_clip=5e-324` clipped every
    gradient to 0 (#27 pass 41), `train.ema=0.999999999` is 1 (the EMA weights never moved from the initial ones),
    `halting.eps=1e-9` leaves 1 - eps at 1 (pass 41's leftover)."""
    if not (isinstance(value, int | float) and ok(value)):
        return
    with np.errstate(over="ignore", under="ignore"):
        held = float(np.float32(value))
    _check(ok(held), f"{key}={value!r} is {held:g} in float32, the precision training computes in, where {key} cannot "
           f"be {held:g}; give a value float32 holds, e.g. {key}={example}")


def _check_weights(cfg: Any, names: tuple[str, ...], path: str) -> None:
    """Loss weights ``names`` of ``cfg`` must be finite and >= 0 (a NaN passes min(), and an infinite weight
    trained a NaN at step 1, blamed on train.lr), also in float32 (`_check_f32`)."""
    bad = next((k for k in names if not 0 <= getattr(cfg, k) < math.inf), None)
    _check(bad is None, f"{path}.{bad} must be a finite number >= 0, got {getattr(cfg, bad or names[0])}")
    for k in names:
        _check_f32(getattr(cfg, k), f"{path}.{k}")


def _check_read(cfg: Any, reads: tuple[str, ...], path: str) -> None:
    """ConfigError for a setting of ``cfg`` (a `HaltingConfig` or `RouterConfig`) changed from its default that its
    kind does not read (``reads``): `halting.tau` on ouro, `router.capacity` on token_choice would be accepted and
    unused."""
    unread = _changed(cfg, (f.name for f in dataclasses.fields(cfg) if f.name != "kind" and f.name not in reads))
    if unread:
        raise ConfigError(f"{path}.{unread}={getattr(cfg, unread)} is not read by {path}.kind={cfg.kind} (it "
                          f"reads {', '.join(reads) or 'none of its settings'}); drop it")


@dataclass
class HaltingConfig:
    """A learned exit (`loopformer.variants.halting`): ``kind`` adds a halting head to the circuit (its
    architecture); the rest are loss weights of training and the default exit quantile."""

    kind: str = "none"  # none | ouro | pondernet | act
    beta: float = 0.1  # ouro: entropy bonus weight (decays linearly to beta_final) | pondernet: KL weight
    beta_final: float = 0.05  # ouro: beta at the last training step
    prior: float = 0.2  # pondernet: the geometric prior's exit probability per step
    tau: float = 0.01  # act: ponder-cost weight
    eps: float = 0.01  # act: halt once the summed halting probabilities reach 1 - eps
    q: float = 0.5  # ouro / pondernet: evaluation exits once the exit CDF reaches q
    # train.stage=gate (Ouro stage II): the head's target to continue after step t is
    # sigmoid(gate_k * (improvement of step t + 1 - gate_gamma)), the improvement in per-token CE
    gate_k: float = 50.0
    gate_gamma: float = 0.005

    def validate(self, path: str) -> None:
        _one_of(self.kind, HALTINGS, f"{path}.kind")
        _check(math.isfinite(self.gate_k) and self.gate_k > 0,
               f"{path}.gate_k must be a finite number > 0 (the slope of stage II's targets), got {self.gate_k}")
        _check(math.isfinite(self.gate_gamma) and self.gate_gamma >= 0,
               f"{path}.gate_gamma must be a finite number >= 0 (the loss improvement worth a step), got {self.gate_gamma}")
        _check_f32(self.gate_k, f"{path}.gate_k")
        _check_f32(self.gate_gamma, f"{path}.gate_gamma")
        _check_weights(self, ("beta", "beta_final", "tau"), path)
        _check(0 < self.prior < 1, f"{path}.prior must be in (0, 1), got {self.prior}")
        _check(0 < self.eps < 1, f"{path}.eps must be in (0, 1), got {self.eps}")
        # act halts once the summed probabilities reach 1 - eps, computed in float32: where 1 - eps rounds to 1
        # (eps below 6e-8) no token halts before its cap
        _check(float(np.float32(1.0 - self.eps)) < 1, f"{path}.eps={self.eps:g} is below float32's resolution at 1 "
               f"(1 - eps is 1 in float32, the precision the halting sums are computed in, so no token would halt "
               f"before its cap); give eps >= 1e-7, e.g. {path}.eps=0.01")
        _check(0 < self.q <= 1, f"{path}.q must be in (0, 1], got {self.q}")
        _check_read(self, HALTINGS.get(self.kind).reads, path)
        self.rule().validate(path)

    def rule(self) -> Halting:
        """The halting kind with these settings."""
        return Halting.of(self)

    @property
    def has_head(self) -> bool:
        return self.kind in HALTINGS and HALTINGS.get(self.kind).has_head


WINDOW_ROUNDS = ("bank", "own")  # router.window
ROUTER_INPUTS = ("change", "context")  # router.inputs


@dataclass
class RouterConfig:
    """A router over a stage's circuits (`loopformer.variants.routing`): ``kind`` (and ``exit``) add its
    scoring layer (architecture); the rest are its settings."""

    kind: str = "none"  # none | token_choice | expert_choice
    exit: bool = True  # token_choice: an exit option besides the circuits
    capacity: float = 0.5  # expert_choice: share of a sequence's tokens each circuit takes at round 0 ...
    # ... and at round r: capacities[r] (the last one past the list), or if empty MoR's linear schedule
    # capacity * (R - r) / R over the bank's R = max_loops rounds
    capacities: list[float] = field(default_factory=list)
    balance: float = 0.01  # token_choice: load-balancing loss weight
    aux: float = 1e-3  # expert_choice: BCE weight between scores and selections
    compute: float = 0.0  # cost per round a token keeps running (pushes exits earlier)
    # rounds whose states carry gradient: each token's last k rounds before it exits (the truncation a loop's
    # backprop is, per token); 0: every round
    backprop: int = 0
    # the rounds train.iteration_loss reads on this bank: bank (its last W rounds; a token that stopped earlier
    # holds its final state in each) | own (each token's own last W rounds, as a loop's window reads each
    # token's last W iterations)
    window: str = "bank"
    # what the router reads besides the normed stream (architecture: a linear map of them joins its scores):
    # change (log10 of the token's latent change ||h_r - h_{r-1}|| / ||h_r|| over its last round) | context (the
    # largest change among the tokens that can reach it: the tokens before it in a causal model, its whole row in a
    # bidirectional one, as context_diff reads them)
    inputs: list[str] = field(default_factory=list)

    def validate(self, path: str) -> None:
        _one_of(self.kind, ROUTERS, f"{path}.kind")
        _one_of(self.window, WINDOW_ROUNDS, f"{path}.window")
        _check(isinstance(self.inputs, list) and all(isinstance(i, str) for i in self.inputs),
               f"{path}.inputs must be a list of {', '.join(ROUTER_INPUTS)}, got {self.inputs!r}")
        for i in self.inputs:
            _one_of(i, ROUTER_INPUTS, f"{path}.inputs")
        twice = [i for i in self.inputs if self.inputs.count(i) > 1]
        _check(not twice, f"{path}.inputs lists {twice[0]!r} twice: {self.inputs}; give each once" if twice else "")
        # (past the loop limit it was an OverflowError traceback from JAX at the first step)
        _check(isinstance(self.backprop, int) and not isinstance(self.backprop, bool) and 0 <= self.backprop <= MAX_LOOPS,
               f"{path}.backprop (rounds with gradient; 0: every round) must be an integer in 0..{MAX_LOOPS}, got "
               f"{self.backprop!r}")
        _check(0 < self.capacity <= 1, f"{path}.capacity must be in (0, 1], got {self.capacity}")
        _check(all(0 < c <= 1 for c in self.capacities),
               f"{path}.capacities: each round's share must be in (0, 1], got {self.capacities}")
        _check(not self.capacities or self.kind == "expert_choice",
               f"{path}.capacities: per-round shares are expert_choice's (kind is {self.kind}); drop them")
        _check_weights(self, ("balance", "aux", "compute"), path)
        _check_read(self, ROUTERS.get(self.kind).reads, path)

    def rule(self) -> RouterKind:
        return RouterKind.of(self)

    @property
    def routes(self) -> bool:
        return self.kind in ROUTERS and ROUTERS.get(self.kind).routes


@dataclass
class CircuitArch:
    """What a circuit's weights depend on: a stack of ``depth`` blocks of width ``width``."""

    name: str = "X"
    depth: int = 1
    width: int = 64
    heads: int = 4
    kv_heads: int = 0  # key/value heads (grouped-query attention; 0 = heads); must divide heads
    mlp_ratio: float = 4.0
    io: str = "slice"  # slice: reads and writes its own columns of the stream | project: learned d_model <-> width
    inject: str = "add"  # input injection each iteration: add | concat (a learned [h; e] -> width adapter) | none
    state_norm: bool = False  # RMS-normalise the state after every iteration (bounded; fixed points possible)
    halting: HaltingConfig = field(default_factory=HaltingConfig)  # a learned exit head (kind: none = no head)
    output: str = "residual"  # residual: x + write(out_norm(h_n)) | replace: the circuit reads its slice of the
    # raw (unnormed) stream and its final state h_n replaces that slice (no out_norm, no write: a plain
    # model's layers converted into a loop are exact at 1 loop; `loopformer convert`)

    @property
    def mlp_hidden(self) -> int:
        return mlp_hidden(self.width, self.mlp_ratio)

    @property
    def kv_head_count(self) -> int:
        return self.kv_heads or self.heads

    @property
    def sliced(self) -> bool:
        """io: slice (reads and writes its own columns of the stream)."""
        return self.io == "slice"

    @property
    def replaces(self) -> bool:
        """output: replace (its final state replaces its slice of the raw stream)."""
        return self.output == "replace"


@dataclass
class CircuitBehaviour:
    """How a circuit's weights are used; no parameter depends on these."""

    window: int = 0  # attention span inside the circuit: 0 = full; w = each token sees itself and the w - 1
    # tokens before it (a local step, like DeepThinking's convolutions: information travels w - 1
    # positions per block per iteration, so longer inputs need more loops)
    init: str = "zeros"  # initial state: zeros | input | noise
    init_noise_std: float = 1.0


@dataclass
class LoopSchedule:
    """How many times a circuit runs: the training distribution (capped at ``max_loops``), the
    truncation depth k of backprop, and the default count at evaluation."""

    loops: str = "fixed(4)"  # training loop-count distribution (see LoopDistribution)
    max_loops: int = 64  # cap on sampled training counts
    eval_loops: int = 4  # default count at evaluation
    backprop: int = 4  # truncation depth k: gradient flows through the last k iterations

    def distribution(self) -> LoopDistribution:
        return LoopDistribution.parse(self.loops, cap=self.max_loops)


@dataclass
class CircuitConfig(LoopSchedule, CircuitBehaviour, CircuitArch):
    """One looped circuit as written in YAML: architecture, behaviour and loop schedule in one entry."""

    def schedule(self) -> LoopSchedule:
        return LoopSchedule(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoopSchedule)})

    def validate(self, path: str) -> None:
        c, p = self, path
        _check(c.name.isidentifier(), f"{p}.name: '{c.name}' must be an identifier (letters, digits, _)")
        _check(1 <= c.depth <= MAX_LAYERS, f"{p}.depth must be in 1..{MAX_LAYERS:,}, got {c.depth}")
        _check(2 <= c.width <= MAX_WIDTH, f"{p}.width must be in 2..{MAX_WIDTH:,}, got {c.width}")
        _check(c.heads >= 1, f"{p}.heads must be >= 1, got {c.heads}")
        _check(c.kv_heads >= 0 and c.heads % c.kv_head_count == 0,
               f"{p}.kv_heads ({c.kv_heads}) must divide {p}.heads ({c.heads}) (0 = as many as heads)")
        _check(c.width % c.heads == 0, f"{p}.width ({c.width}) must be divisible by {p}.heads ({c.heads})")
        _check((c.width // c.heads) % 2 == 0, f"{p}: width / heads = {c.width // c.heads} must be even (RoPE rotates pairs)")
        _check_mlp_and_window(c, p)
        _one_of(c.io, IO_MODES, f"{p}.io")
        _one_of(c.inject, INJECTIONS, f"{p}.inject")
        _one_of(c.init, INITS, f"{p}.init")
        _check(c.init == "noise" or c.init_noise_std == CircuitConfig.init_noise_std,
               f"{p}.init_noise_std={c.init_noise_std} is read only by init: noise (got {c.init}); drop it")
        # (NaN or 1e300 started every state at NaN / inf, a NaN loss blamed on train.lr; -1 ran as 1; 0 is init: zeros)
        _check(0 < c.init_noise_std <= MAX_NOISE_STD, f"{p}.init_noise_std (the initial state's standard deviation) "
               f"must be in (0, {MAX_NOISE_STD:g}], e.g. 1.0 (0 is init: zeros), got {c.init_noise_std}")
        _one_of(c.output, OUTPUT_MODES, f"{p}.output")
        if c.output == "replace":
            _check(c.io == "slice" and not c.state_norm and not c.halting.has_head,
                   f"{p}.output=replace: the final state replaces the circuit's slice of the stream, so it needs "
                   f"io: slice, state_norm: false and no halting head")
        _check(1 <= c.backprop <= MAX_LOOPS, f"{p}.backprop (truncation depth k) must be in 1..{MAX_LOOPS}, got "
               f"{c.backprop}")
        _check(1 <= c.eval_loops <= MAX_LOOPS, f"{p}.eval_loops must be in 1..{MAX_LOOPS}, got {c.eval_loops}")
        _check(1 <= c.max_loops <= MAX_LOOPS, f"{p}.max_loops must be in 1..{MAX_LOOPS}, got {c.max_loops}")
        try:
            dist = c.distribution()
        except ValueError as e:
            raise ConfigError(f"{p}.loops: {e}") from None
        # max_loops caps every training draw: below the counts loops draws, it would silently clamp them
        # (and every summary would still show the uncapped distribution)
        top, what = dist.bulk()
        _check(top <= MAX_LOOPS, f"{p}.loops: {what} would be past the limit of {MAX_LOOPS} loops; lower loops")
        # (per_difficulty's counts grow with the data's difficulty, which Config._validate_per_difficulty reads: here
        # only difficulty 1 is known, and "raise max_loops to >= a + b" was refused again at the training range's hi)
        _check(c.max_loops >= top or dist.per_example, f"{p}.max_loops={c.max_loops} is below {what} would be clamped "
               f"to {c.max_loops}, silently changing the training distribution; raise max_loops to >= {math.ceil(top)} "
               f"or lower loops")
        c.halting.validate(f"{p}.halting")


CIRCUIT_PARTS = {f.name: part for cls, part in ((CircuitArch, ARCHITECTURE), (CircuitBehaviour, BEHAVIOUR),
                                                 (LoopSchedule, SCHEDULE)) for f in dataclasses.fields(cls)}


@dataclass
class StageConfig:
    """A parallel bank: its circuits read the same stream and their outputs are added (the ⊕); with a
    router, the circuits run in rounds and the router picks, per token, which one runs next (or exit)."""

    circuits: list[CircuitConfig] = field(default_factory=lambda: [CircuitConfig()])
    router: RouterConfig = field(default_factory=RouterConfig)


# ----------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """embed -> prelude blocks -> stages (banks of looped circuits) -> coda blocks -> norm -> head."""

    vocab_size: int = _arch(0)  # 0: taken from the data
    d_model: int = _arch(64)
    heads: int = _arch(4)
    kv_heads: int = _arch(0)  # key/value heads of prelude and coda (grouped-query attention; 0 = heads)
    qkv_bias: bool = _arch(False)  # biases on the query/key/value projections (Qwen2), in every block
    mlp_ratio: float = _arch(4.0)
    mlp: str = _arch("gelu")  # gelu | swiglu
    norm: str = _arch("pre")  # pre | sandwich (also normalises each sublayer's output)
    prelude: int = _arch(1)
    coda: int = _arch(1)
    stages: list[StageConfig] = _arch(default_factory=lambda: [StageConfig()])  # [] = a plain transformer
    tie_embeddings: bool = _arch(True)
    window: int = 0  # attention span of prelude and coda blocks (0 = full; see CircuitBehaviour.window)
    causal: bool = True  # false: bidirectional attention everywhere (the window reaches w - 1 tokens both
    # ways); only for tasks whose labels sit at input positions (aligned), where no target is an input
    rope_base: float = 10000.0  # RoPE theta
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # {} or {kind: linear | llama3, factor, and for
    # llama3 low_freq_factor, high_freq_factor, original_max}: Hugging Face's rope_scaling (variants/position.py)
    position: str = _arch("rope")  # rope | none (NoPE) | abacus (NoPE + each digit's place in its number) | coupled
    # (RoPE over each digit's place: position coupling): how the model sees positions (loopformer/variants/position.py)
    abacus_size: int = _arch(128)  # abacus: place embeddings 1 .. abacus_size - 1 (the data must fit: checked)
    abacus_digits: list[int] = _arch(default_factory=list)  # abacus, coupled: the digit token ids [lo, hi] (inclusive);
    # [] = the data's (a task's digit or bit tokens; the byte tokenizer's '0'..'9')
    position_offset: int = 0  # abacus: training adds U{0..K} per example to every place (McLeish et al.'s
    # random offset; 0 = none), so places past the trained lengths are seen; evaluation adds none
    place_window: int = _arch(0)  # abacus, coupled: attention only between tokens at most W digit places apart
    # (every non-digit sits at place 0; 0 = no such window), so a query sees the same places however long the numbers
    norm_eps: float = 1e-6  # epsilon of every RMSNorm: x * rsqrt(mean(x^2) + eps) * scale
    init_std: float = 0.02
    compute_dtype: str = "float32"  # bfloat16: bf16 matmuls, fp32 parameters and logits
    attention: str = "auto"  # auto | xla | einsum | cudnn: the attention kernel (auto: einsum on CPU, cuDNN's
    # flash attention on NVIDIA GPUs for bf16/fp16, else XLA's; see loopformer/model/attend.py)

    def circuits(self) -> list[CircuitConfig]:
        return [c for s in self.stages for c in s.circuits]

    def circuit(self, name: str) -> CircuitConfig:
        return next(c for c in self.circuits() if c.name == name)

    def stage_of(self, name: str) -> int:
        """The index S of the stage that holds circuit ``name``."""
        return next(i for i, stage in enumerate(self.stages) if any(c.name == name for c in stage.circuits))

    def circuit_field(self, name: str, field: str) -> str:
        """The override path of circuit ``name``'s ``field``: model.stages.S.circuits.NAME.FIELD."""
        return f"model.stages.{self.stage_of(name)}.circuits.{name}.{field}"

    @property
    def max_heads(self) -> int:
        """The most attention heads of any block (prelude, coda or a circuit's): what bounds attention's memory."""
        return max([self.heads] + [c.heads for c in self.circuits()])

    def halting_circuit(self) -> CircuitConfig | None:
        """The circuit with a learned halting head (at most one per model), or None."""
        return next((c for c in self.circuits() if c.halting.has_head), None)

    def schedules(self) -> dict[str, LoopSchedule]:
        return {c.name: c.schedule() for c in self.circuits()}

    @property
    def mlp_hidden(self) -> int:
        return mlp_hidden(self.d_model, self.mlp_ratio)

    @property
    def kv_head_count(self) -> int:
        return self.kv_heads or self.heads

    @property
    def places(self) -> bool:
        """Whether the model embeds each digit's place (model.position: abacus)."""
        return POSITIONS.get(self.position, "model.position").places

    @property
    def reads_places(self) -> bool:
        """Whether the model reads each digit's place (abacus embeds it, coupled rotates by it): it needs the
        digit token ids."""
        scheme = POSITIONS.get(self.position, "model.position")
        return scheme.places or scheme.on_places

    def _validate_abacus(self) -> None:
        m = self
        _check(isinstance(m.abacus_size, int) and 2 <= m.abacus_size <= MAX_WIDTH,
               f"model.abacus_size must be an integer in 2..{MAX_WIDTH:,} (places 1 .. size - 1), got {m.abacus_size!r}")
        d = m.abacus_digits
        _check(isinstance(d, list) and (d == [] or (len(d) == 2 and all(isinstance(v, int) and v >= 0 for v in d)
                                                      and d[0] <= d[1])),
               f"model.abacus_digits must be [lo, hi], the digit token ids (0 <= lo <= hi), or [] to take them from "
               f"the data; got {d!r}")
        _check(isinstance(m.position_offset, int) and 0 <= m.position_offset < m.abacus_size - 1,
               f"model.position_offset must be an integer in 0 .. abacus_size - 2 = {m.abacus_size - 2}, got "
               f"{m.position_offset!r}; lower it or raise model.abacus_size")
        _check(isinstance(m.place_window, int) and 0 <= m.place_window <= MAX_WINDOW,
               f"model.place_window must be 0 (no window) or 1..{MAX_WINDOW:,} digit places, got {m.place_window!r}")
        _check(not m.place_window or m.reads_places, f"model.place_window={m.place_window} compares digit places, which "
               f"only model.position=abacus or coupled reads (got {m.position}); set one of them or drop it")
        if not m.places:
            why = ("rotates by digit places and takes no offset" if m.reads_places else
                   "is shift-invariant (an offset changes nothing)")
            _check(m.position_offset == 0, f"model.position_offset={m.position_offset} only moves abacus places: "
                   f"model.position={m.position} {why}; set model.position=abacus or model.position_offset=0")
            _check(not d or m.reads_places, f"model.abacus_digits={d} is read only by model.position=abacus or coupled "
                   f"(got {m.position}); drop it")
            _check(m.abacus_size == ModelConfig.abacus_size, f"model.abacus_size={m.abacus_size} is read only by "
                   f"model.position=abacus (got {m.position}); drop it")

    def validate(self) -> None:
        m = self
        _check(2 <= m.d_model <= MAX_WIDTH, f"model.d_model must be in 2..{MAX_WIDTH:,}, got {m.d_model}")
        _check(m.heads >= 1, f"model.heads must be >= 1, got {m.heads}")
        _check(m.kv_heads >= 0 and m.heads % m.kv_head_count == 0,
               f"model.kv_heads ({m.kv_heads}) must divide model.heads ({m.heads}) (0 = as many as heads)")
        _check(0 < m.norm_eps < math.inf, f"model.norm_eps must be a finite number > 0, got {m.norm_eps}")
        # nan or 1e300 (inf in float32) diverged at step 1, blamed on train.lr; -1 trained as 1; 0 a model of zeros,
        # whose every gradient is zero
        _check_range(m.init_std, "model.init_std", lambda v: 0 < v <= 1, f"model.init_std (the weights' initial "
                     f"standard deviation) must be in (0, 1], e.g. 0.02, got {m.init_std}", 0.02)
        _check_in_f32(m.norm_eps, "model.norm_eps", lambda v: 0 < v < math.inf, 1e-6)
        _check(1 < m.rope_base < math.inf, f"model.rope_base must be a finite number > 1, got {m.rope_base}")
        _check(m.d_model % m.heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.heads ({m.heads})")
        _check((m.d_model // m.heads) % 2 == 0,
               f"model.d_model / model.heads = {m.d_model // m.heads} must be even (RoPE rotates pairs)")
        _check(0 <= m.prelude <= MAX_LAYERS and 0 <= m.coda <= MAX_LAYERS,
               f"model.prelude and model.coda must be in 0..{MAX_LAYERS:,} layers, got {m.prelude} and {m.coda}")
        _check(0 <= m.vocab_size <= MAX_WIDTH,
               f"model.vocab_size must be in 0..{MAX_WIDTH:,} (0 takes it from the data), got {m.vocab_size}")
        _check_mlp_and_window(m, "model")
        _one_of(m.norm, NORM_MODES, "model.norm")
        _one_of(m.mlp, MLP_KINDS, "model.mlp")
        _one_of(m.compute_dtype, DTYPES, "model.compute_dtype")
        _one_of(m.attention, ATTENTION_IMPLS, "model.attention")
        _one_of(m.position, POSITIONS, "model.position")
        self._validate_abacus()
        try:
            scaling = RopeScaling.of(m.rope_scaling, "model.rope_scaling")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(scaling is None or m.position == "rope", f"model.rope_scaling scales RoPE's frequencies, but "
               f"model.position={m.position}; drop model.rope_scaling or set model.position=rope")
        # (accepted and ignored: none and abacus rotate nothing)
        _check(m.rope_base == ModelConfig.rope_base or POSITIONS.get(m.position).rotates, f"model.rope_base="
               f"{m.rope_base:g} is read only by RoPE (model.position=rope or coupled), and model.position={m.position} "
               f"rotates nothing; drop it")
        halting = [c.name for c in m.circuits() if c.halting.has_head]
        _check(len(halting) <= 1, f"model: at most one circuit may have a halting head (it is read out after every "
               f"iteration), got {', '.join(halting)}")
        seen: set[str] = set()
        for s, stage in enumerate(m.stages):
            _check(len(stage.circuits) >= 1, f"model.stages.{s}.circuits: a stage needs at least one circuit")
            for i, c in enumerate(stage.circuits):
                # by its name where it has one (an empty or dotted name made "circuits..name" / "circuits.a.b.name")
                p = f"model.stages.{s}.circuits.{c.name if c.name.isidentifier() else i}"
                c.validate(p)
                _check(c.name not in seen, f"{p}.name: circuit name '{c.name}' is used twice; names must be unique")
                # two names that read the same (é as U+00E9 and as e + U+0301, Ｘ and X) were two circuits, and a flag
                # naming one picked it by its code points (#27 pass 41)
                twin = next((n for n in seen if unicodedata.normalize("NFKC", n)
                             == unicodedata.normalize("NFKC", c.name)), None)
                _check(twin is None, f"{p}.name: circuit name '{c.name}' reads as circuit {twin}'s (the same letters "
                       f"in another Unicode form), so a flag or setting naming one could not be told from the other; "
                       f"rename one")
                seen.add(c.name)
            stage.router.validate(f"model.stages.{s}.router")
            rounds = max(c.max_loops for c in stage.circuits)
            _check(len(stage.router.capacities) <= rounds,
                   f"model.stages.{s}.router.capacities: {len(stage.router.capacities)} shares, but the stage runs at "
                   f"most {rounds} rounds in training (its circuits' max_loops; the last share holds past the list); "
                   f"give at most {rounds}")
            if stage.router.routes:
                _check(all(c.output == "residual" for c in stage.circuits),
                       f"model.stages.{s}: a routed stage's circuits must have output: residual")
                _check(not any(c.halting.has_head for c in stage.circuits),
                       f"model.stages.{s}: a routed stage's circuits cannot also have a halting head (the router "
                       f"decides their exits); set router.kind=none or halting.kind=none")
            sliced = [c for c in stage.circuits if c.io == "slice"]
            total = sum(c.width for c in sliced)
            widths = " + ".join(str(c.width) for c in sliced)
            if len(sliced) == len(stage.circuits):
                _check(total == m.d_model, f"model.stages.{s}: slice circuit widths {widths} = {total} must sum to "
                       f"model.d_model = {m.d_model} (or use io: project)")
            else:
                _check(total <= m.d_model,
                       f"model.stages.{s}: slice circuit widths {widths} = {total} exceed model.d_model = {m.d_model}")


# ----------------------------------------------------------------------------- data, training, evaluation

MIXTURE_TASK = "mixture"  # data.task of a run that trains on data.mixture
SPLIT_SEP = "/"  # a mixture's eval splits are named NAME/SPLIT


def _check_paths(paths: list[str], key: str) -> None:
    """An empty entry of a corpus's paths reads as the current directory: every file under it would be read."""
    _check(all(p.strip() for p in paths), f"{key}: {paths} holds an empty path, which would read every file under "
           f"the current directory; name the corpus (files, globs or a directory)")
    for p in paths:
        _check_no_nul(p, key)


def _check_no_nul(path: str, key: str) -> None:
    """A path (or a name in one) holding a NUL byte, which no file system allows: YAML writes it as "\\0", and it
    reached the first open or mkdir as a ValueError traceback ("embedded null byte"), after the run was set up."""
    _check("\0" not in path, f"{key}: {path!r} holds a NUL byte (\\0), which no file or folder name can hold; "
           f"remove it")


def _check_split_names(key: str, splits: dict[str, list[int]]) -> None:
    """Split names are what --split selects and what metrics and files are named by: a blank one was refused
    only when the data was built (after `train` printed its mesh), without naming the setting."""
    for k in splits:
        _check(str(k).strip() != "", f"{key}: a split name is blank ({k!r}); name it, e.g. {{train: [1, 4]}}")
        # a mixture's entries were refused one; a task's 'a/b' took a mixture's form, and rys wrote its plot and a
        # split 'a_b''s to one file (rys_a_b.png), the second replacing the first
        _check(SPLIT_SEP not in str(k), f"{key}.{k}: split names may not contain '{SPLIT_SEP}' (it joins a mixture's "
               f"entry and split, NAME{SPLIT_SEP}SPLIT); use another name, e.g. {str(k).replace(SPLIT_SEP, '-')}")


def _check_ranges(items: list[tuple[str, list[int]]]) -> None:
    for key, rng in items:
        _check(len(rng) == 2 and 1 <= rng[0] <= rng[1], f"{key}: expected [lo, hi] with 1 <= lo <= hi, got {rng}")


@dataclass
class MixtureEntry:
    """One task of a multi-task run (``data.mixture``): what it draws and, with ``route``, which
    circuits its examples may update (gradient routing; None = every parameter)."""

    task: str = ""  # a synthetic task (prefix_parity, maze, ...) or text
    name: str = ""  # its eval splits are NAME/SPLIT (default: the task)
    weight: float = 1.0  # share of the training examples: weight / the sum of the weights
    task_args: dict[str, Any] = field(default_factory=dict)
    train_difficulty: list[int] = field(default_factory=lambda: [1, 4])
    eval_splits: dict[str, list[int]] = field(default_factory=lambda: {"train": [1, 4]})
    paths: list[str] = field(default_factory=list)  # text: the corpus (data.tokenizer, data.seq_len, ... apply)
    route: list[str] | None = None  # circuits this entry's examples update (None: all parameters)
    route_shared: bool = True  # with route: also the shared parameters (embeddings, prelude, coda, norms, head)

    def __post_init__(self) -> None:
        self.name = self.name or self.task

    def validate(self, path: str) -> None:
        _check(bool(self.task), f"{path}.task: name the entry's task, e.g. {{task: prefix_parity, weight: 1}}")
        _check(bool(self.name) and SPLIT_SEP not in self.name and "." not in self.name,
               f"{path}.name: '{self.name}' must be non-empty without '{SPLIT_SEP}' or '.' (it prefixes split names)")
        _check(math.isfinite(self.weight) and self.weight > 0,
               f"{path}.weight must be a finite number > 0, got {self.weight}")
        if self.task == "text":
            _check(len(self.paths) >= 1, f"{path}.paths: name the corpus of a text entry, e.g. "
                   f"paths: ['asset:kjv_genesis_exodus.txt']")
            _check_paths(self.paths, f"{path}.paths")
            unused = _changed(self, TASK_ONLY)
            _check(unused is None, f"{path}.{unused}={getattr(self, unused or 'task')} is a setting of synthetic tasks, "
                   f"and a text entry evaluates on its held-out documents (the splits {self.name}{SPLIT_SEP}val and "
                   f"{self.name}{SPLIT_SEP}train), so it would not be used; drop it")
        else:
            _check(not self.paths, f"{path}.paths={self.paths} names a corpus, which only a text entry reads, and "
                   f"{path}.task={self.task} builds its own examples; drop it (or set task: text)")
            _check(len(self.eval_splits) >= 1, f"{path}.eval_splits: name at least one split, e.g. {{train: [1, 4]}}")
            _check_ranges([(f"{path}.train_difficulty", self.train_difficulty)]
                          + [(f"{path}.eval_splits.{k}", v) for k, v in self.eval_splits.items()])
            _check_split_names(f"{path}.eval_splits", self.eval_splits)
        if self.route is not None:
            _check(len(self.route) == len(set(self.route)), f"{path}.route lists a circuit twice: {self.route}")
            _check(bool(self.route) or self.route_shared, f"{path}: route: [] with route_shared: false updates "
                   f"nothing; list circuits in route, set route_shared: true, or drop route (every parameter)")

    def split_ranges(self) -> dict[str, list[int] | None]:
        """This entry's eval splits (NAME/SPLIT) -> difficulty [lo, hi] (None for text)."""
        if self.task == "text":
            return {f"{self.name}{SPLIT_SEP}val": None, f"{self.name}{SPLIT_SEP}train": None}
        return {f"{self.name}{SPLIT_SEP}{k}": v for k, v in self.eval_splits.items()}


@dataclass
class CurriculumStage:
    """One stage of a difficulty curriculum (``data.curriculum``): training steps before ``until`` draw
    their examples from ``difficulty`` [lo, hi] (after the previous stage's ``until``)."""

    until: int = 0
    difficulty: list[int] = field(default_factory=list)  # required: [] is refused


# data settings that only text reads (a synthetic task builds its own examples and vocabulary)
TASK_ONLY = ("task_args", "train_difficulty", "eval_splits")  # read by synthetic tasks alone
TEXT_ONLY = ("paths", "format", "text_field", "doc_separator", "tokenizer", "prompt_format", "stop_ids", "vocab_size",
             "seq_len", "val_fraction")


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
    tokenizer: str = "bytes"  # bytes | bpe (trained on the training split) | a path to a tokenizer.json;
    # saved with the run as <run>/tokenizer.json
    prompt_format: str = "documents"  # how `generate --prompt` encodes: documents (BOS + ids, as documents are
    # trained) | tokenizer (the tokenizer.json's own post-processor: what transformers does; `import` sets it)
    stop_ids: list[int] = field(default_factory=list)  # `generate` ends a row at any of these token ids ([]: the
    # tokenizer's end-of-text); `import` sets them from the folder's generation_config.json (eos_token_id)
    vocab_size: int = 1024  # bpe: vocabulary size including the specials and the 256 bytes
    seq_len: int = 256  # tokens per packed training window
    val_fraction: float = 0.05  # share of documents held out for validation (chosen by a hash of the text)
    # --- several tasks (task: mixture): batches mix the entries by weight; splits are NAME/SPLIT
    mixture: list[MixtureEntry] = field(default_factory=list)
    # --- a difficulty curriculum (synthetic tasks): [{until: STEP, difficulty: [lo, hi]}, ...] in order of
    # until; each stage's range applies before its step, train_difficulty after the last. Deterministic in
    # (seed, step), so a resumed run draws what an uninterrupted one would (loopformer.data.pipeline.Curriculum)
    curriculum: list[CurriculumStage] = field(default_factory=list)

    @property
    def routed(self) -> bool:
        """Whether any mixture entry routes its gradient (``route``)."""
        return any(e.route is not None for e in self.mixture)

    def task_label(self) -> str:
        """``prefix_parity``, or for a mixture ``mixture(prefix_parity, maze)``."""
        return f"{MIXTURE_TASK}({', '.join(e.name for e in self.mixture)})" if self.mixture else self.task

    def split_ranges(self) -> dict[str, list[int] | None]:
        """Every eval split -> its difficulty [lo, hi] (None for text splits)."""
        if self.mixture:
            return {k: v for e in self.mixture for k, v in e.split_ranges().items()}
        if self.task == "text":
            return {"val": None, "train": None}
        return dict(self.eval_splits)

    def _validate_curriculum(self) -> None:
        if not self.curriculum:
            return
        _check(self.task not in ("text", MIXTURE_TASK), f"data.curriculum: a difficulty curriculum needs a synthetic "
               f"task, not data.task={self.task}; drop data.curriculum")
        lo, hi = self.train_difficulty
        last = 0
        for j, stage in enumerate(self.curriculum):
            key = f"data.curriculum.{j}"
            _check(isinstance(stage.until, int) and stage.until > last,
                   f"{key}.until must be a step after the previous stage's ({last}), got {stage.until}")
            _check(bool(stage.difficulty), f"{key}.difficulty is missing: give the stage's range, e.g. "
                   f"{{until: {stage.until}, difficulty: [{lo}, {hi}]}}")
            _check_ranges([(f"{key}.difficulty", stage.difficulty)])
            _check(stage.difficulty[1] <= hi, f"{key}.difficulty {stage.difficulty} reaches above data.train_difficulty's "
                   f"hi {hi} (sequences are sized by it); lower the stage or raise train_difficulty")
            last = stage.until

    def validate(self) -> None:
        d = self
        _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
        _check(1 <= d.eval_examples <= MAX_EVAL_EXAMPLES, f"data.eval_examples must be in 1..{MAX_EVAL_EXAMPLES:,} (each "
               f"split's examples are built in memory first; 10,000 gives ±1% at 95%), got {d.eval_examples}")
        _check(d.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {d.eval_batch_size}")
        _check_ranges([("data.train_difficulty", d.train_difficulty)]
                      + [(f"data.eval_splits.{k}", v) for k, v in d.eval_splits.items()])
        _check(len(d.eval_splits) >= 1, "data.eval_splits: name at least one split, e.g. {train: [1, 4]}")
        _check_split_names("data.eval_splits", d.eval_splits)
        _check(bool(d.mixture) == (d.task == MIXTURE_TASK),
               "data.mixture lists the tasks of a multi-task run: set data.task=mixture with it" if d.mixture else
               "data.task=mixture needs data.mixture, e.g. [{task: prefix_parity, weight: 1}, {task: maze, weight: 1}]")
        for i, e in enumerate(d.mixture):
            e.validate(f"data.mixture.{e.name or i}")
        names = [e.name for e in d.mixture]
        dup = next((n for n in names if names.count(n) > 1), None)
        _check(dup is None, f"data.mixture: two entries are named '{dup}'; give one a name (name: {dup}_2): split "
               f"names NAME/SPLIT must be unique")
        _check(sum(e.task == "text" for e in d.mixture) <= 1,
               "data.mixture: at most one text entry (it uses the run's one tokenizer, data.tokenizer)")
        _check(all(1 <= n <= MAX_LOOPS for n in d.eval_loops),
               f"data.eval_loops: counts must be in 1..{MAX_LOOPS}, got {d.eval_loops}")
        _check_once(d.eval_loops, "data.eval_loops")
        self._validate_curriculum()
        _one_of(d.format, TEXT_FORMATS, "data.format")
        _check(d.tokenizer in TOKENIZER_KINDS or d.tokenizer.endswith(".json"),
               f"data.tokenizer: '{d.tokenizer}' is not bytes, bpe or a path to a tokenizer.json")
        _check_no_nul(d.tokenizer, "data.tokenizer")
        _one_of(d.prompt_format, PROMPT_FORMATS, "data.prompt_format")
        _check(isinstance(d.stop_ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in d.stop_ids),
               f"data.stop_ids must be a list of token ids (integers >= 0), got {d.stop_ids!r}")
        _check_once(d.stop_ids, "data.stop_ids")
        _check(d.prompt_format != "tokenizer" or d.tokenizer not in TOKENIZER_KINDS,
               f"data.prompt_format=tokenizer reads a tokenizer.json's post-processor, and data.tokenizer="
               f"{d.tokenizer} has none; use data.prompt_format=documents")
        _check(d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}")
        _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
        escaped = [e for e in ("\\n", "\\t", "\\r") if e in d.doc_separator]  # a backslash and a letter
        _check(not escaped, f"data.doc_separator={d.doc_separator!r} holds {escaped[0] if escaped else ''} as a "
               f"backslash and a letter, not a line break (YAML reads escapes in double quotes only), so files would "
               f"not be split; write doc_separator: \"\\n\\n\" in a config, or 'data.doc_separator=\"\\n\\n\"' on "
               f"the command line")
        if d.task == "text":
            _check(len(d.paths) >= 1, "data.paths: name the corpus for data.task=text, e.g. data.paths=['corpus/*.txt'] "
                   "or data.paths=['asset:kjv_genesis_exodus.txt']")
            _check_paths(d.paths, "data.paths")
            unused = _changed(d, TASK_ONLY)
            _check(unused is None, f"data.{unused}={getattr(d, unused or 'task')} is a setting of synthetic tasks, and "
                   f"data.task=text evaluates on its held-out documents (the split 'val'), so it would not be used; "
                   f"drop it")
        if d.mixture:  # each entry draws and evaluates with its own task settings
            unused = _changed(d, TASK_ONLY)
            _check(unused is None, f"data.{unused}={getattr(d, unused or 'task')} is not read by a mixture: each "
                   f"entry has its own (data.mixture.N.{unused}); move it into the entries it is for")
        if d.task != "text" and not any(e.task == "text" for e in d.mixture):  # a setting that would be silently unused
            unused = _changed(d, TEXT_ONLY)
            if unused is not None:
                raise ConfigError(f"data.{unused}={getattr(d, unused)} is a setting of text data, and data.task="
                                  f"{d.task_label()} builds its own examples, so it would not be used; drop it (or "
                                  f"train on text: data.task=text)")
        if d.task == "text" or any(e.task == "text" for e in d.mixture):
            _check(d.tokenizer != "bpe" or d.vocab_size >= 260,
                   f"data.vocab_size={d.vocab_size} is too small for data.tokenizer=bpe: it needs >= 260 "
                   f"(3 specials + 256 bytes + merges)")
            _check(d.vocab_size <= MAX_WIDTH, f"data.vocab_size must be at most {MAX_WIDTH:,}, got {d.vocab_size}")
            # bytes and a tokenizer.json bring their own vocabulary: the size would be accepted and unused
            _check(d.tokenizer == "bpe" or d.vocab_size == DataConfig.vocab_size,
                   f"data.vocab_size={d.vocab_size} is read only by data.tokenizer=bpe (the size of the BPE trained on "
                   f"the corpus), and data.tokenizer={d.tokenizer} has its own vocabulary; drop it")


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
    # EMA weights (TRM, HRM): an exponential moving average of the params, ema = decay * ema + (1 - decay) *
    # params after every optimizer step. Saved with the checkpoints; evaluation and the analysis commands use it.
    ema: float = 0.0  # the decay, in (0, 1), e.g. 0.999; 0 = off
    # Progressive loss (Bansal et al. 2022, incremental progress training): the objective is
    # (1 - alpha) * L(full counts) + alpha * L(partial), where each circuit of progressive_circuits runs
    # n_free ~ U{0..n-1} iterations without gradient, then k ~ U{1..min(n - n_free, backprop)} with it, and
    # the loss is read there. The loop learns a step that improves any state it reaches, not a schedule.
    progressive: float = 0.0  # alpha; 0 = off (the objective is exactly the plain one)
    # empty: every circuit whose count varies, or if none does every circuit that loops (Config.progressive_circuits)
    progressive_circuits: list[str] = field(default_factory=list)
    # Loss at every iteration of a window (Yang et al. 2024): the CE is averaged over the logits read after each
    # of the last W iterations of one circuit (n, n - 1, ..., n - W + 1; W <= its backprop, so each carries
    # gradient), so the answer is asked for before the last iteration and must stay right after it.
    iteration_loss: int = 0  # W; 0 = off (1: exactly the plain loss)
    # the circuit it reads (and train.settle); empty: the one circuit whose training count varies (or the one that loops)
    iteration_loss_circuit: str = ""
    # Settling loss (after Anil et al. 2022's path independence and Bai et al. 2021's fixed-point regularity): a
    # second forward pass runs that circuit settle_loops times (gradient through its last iterations, as in
    # training) and adds SETTLE * the mean over the real tokens of ||h_N - h_{N-1}||^2 / ||h_N||^2, the squared
    # relative change of its state over iteration N (what exit rules latent_diff and context_diff test), so that
    # the loop comes to rest past the counts it trains at instead of drifting or cycling there.
    settle: float = 0.0  # the weight; 0 = off
    settle_loops: int = 0  # N; 0: unset (train.settle needs one, e.g. twice the circuit's max_loops)
    # all: every parameter trains on the model's objective | gate: Ouro's stage II, only the halting head
    # trains (on the per-step loss improvement, halting.gate_k / gate_gamma), every other parameter frozen
    stage: str = "all"

    def validate(self, batch_size: int) -> None:
        t = self
        for key in ("steps", "warmup_steps", "log_every", "checkpoint_every", "eval_every"):
            _check(getattr(t, key) <= MAX_STEPS, f"train.{key} must be at most {MAX_STEPS:,} steps (the step counter "
                   f"is a 32-bit integer), got {getattr(t, key)}")
        _check(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
        _check_range(t.lr, "train.lr", lambda v: 0 < v < math.inf, f"train.lr must be a finite number > 0, got {t.lr}",
                     1e-3)
        # AdamW's settings: out of range they train a NaN at the first step, blamed on train.lr, or (a negative
        # decay) grow the weights without a word
        _check(0 <= t.weight_decay < math.inf, f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
        _check_f32(t.weight_decay, "train.weight_decay")
        for key in ("b1", "b2"):
            _check_range(getattr(t, key), f"train.{key}", lambda v: 0 <= v < 1, f"train.{key} (AdamW's moment decay) "
                         f"must be in [0, 1), e.g. {getattr(TrainConfig, key)}, got {getattr(t, key)}",
                         getattr(TrainConfig, key))
        _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
        _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
        _check(batch_size % t.grad_accum == 0,
               f"data.batch_size ({batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
        for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
        _check(t.eval_every >= 0, f"train.eval_every must be >= 0 (0: no evaluation while training), got {t.eval_every}")
        _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}")
        if t.grad_clip > 0:  # (0 disables clipping; a clip that is 0 in float32 zeroed every gradient)
            _check_in_f32(t.grad_clip, "train.grad_clip", lambda v: v > 0, 1.0)
        _check(t.ema == 0 or 0 < t.ema < 1, f"train.ema (the decay of the EMA weights) must be in (0, 1), e.g. "
               f"train.ema=0.999, or 0 to turn it off; got {t.ema}")
        if t.ema:  # (0 turns it off; a decay of 1 in float32 kept the initial weights, of 0 copied the params)
            _check_in_f32(t.ema, "train.ema", lambda v: 0 < v < 1, 0.999)
        _check(0 <= t.progressive <= 1, f"train.progressive (alpha of the progressive loss) must be in [0, 1], "
               f"got {t.progressive}")
        if t.progressive:  # (a subnormal alpha is 0 in float32: the plain objective, with the progressive checks on)
            _check_in_f32(t.progressive, "train.progressive", lambda v: 0 < v <= 1, 0.5)
        _check(isinstance(t.iteration_loss, int) and not isinstance(t.iteration_loss, bool) and t.iteration_loss >= 0,
               f"train.iteration_loss (iterations whose loss is averaged, W) must be an integer >= 0 (0: off), "
               f"got {t.iteration_loss!r}")
        _check(0 <= t.settle < math.inf, f"train.settle (the weight of the settling loss) must be a finite number >= 0 "
               f"(0: off), e.g. train.settle=10; got {t.settle}")
        _check_f32(t.settle, "train.settle")
        _check(isinstance(t.settle_loops, int) and not isinstance(t.settle_loops, bool)
               and (t.settle_loops == 0 or 2 <= t.settle_loops <= MAX_LOOPS),
               f"train.settle_loops (the count at which the settling loss is read) must be an integer in 2..{MAX_LOOPS} "
               f"or 0 (unset), got {t.settle_loops!r}")
        _check(t.stage in TRAIN_STAGES, f"train.stage must be one of {', '.join(TRAIN_STAGES)}, got {t.stage!r}")


@dataclass
class EvalConfig:
    sweep_loops: list[int] = field(default_factory=list)  # loop counts shown at the end of training
    sweep_circuits: list[str] = field(default_factory=list)  # circuits set to each count (others stay at
    # their eval_loops); empty = every circuit
    diagnostics: bool = True  # per-circuit state statistics at each eval

    def validate(self, circuits: list[str]) -> None:
        _check(all(1 <= n <= MAX_LOOPS for n in self.sweep_loops),
               f"eval.sweep_loops: counts must be in 1..{MAX_LOOPS}, got {self.sweep_loops}")
        _check_once(self.sweep_loops, "eval.sweep_loops")
        _check_once(self.sweep_circuits, "eval.sweep_circuits")
        for name in self.sweep_circuits:
            have = f"circuits are {', '.join(circuits)}" if circuits else "the model has none: set eval.sweep_circuits=[]"
            _check(name in circuits, f"eval.sweep_circuits: '{name}' is not a circuit; {have}")


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str = "run"

    def validate(self) -> None:
        _check(self.name not in ("", ".", "..") and "/" not in self.name and "\\" not in self.name,
               f"run.name must be a plain directory name, got '{self.name}'")
        for key in ("name", "dir"):  # a YAML "\0" reached mkdir: a ValueError traceback (#27 pass 24)
            _check_no_nul(getattr(self, key), f"run.{key}")
        # a pasted zero-width space made a folder that lists as the name without it, which --run then could not find
        # (#27 pass 42): the run's name is new, so a character that does not show is refused before it is made
        odd = hidden_char(self.name)
        _check(odd is None, f"run.name '{escaped(self.name)}' {holds(odd or ' ')}, a character that does not show: "
               f"the run's folder would list as a name it is not; retype it without it")
        # orbax reads a checkpoint path as a glob pattern: a run under a [ or ] saves checkpoints it cannot read back
        where = str(Path(self.dir).expanduser().absolute() / self.name)
        _check(not any(ch in where for ch in "[]"), f"run.name / run.dir: the run directory {where} has a '[' or ']', "
               f"which the checkpoint library reads as a pattern (its checkpoints could not be read back); rename it")
        byte = not_utf8(where)  # the checkpoint library cannot open it: a traceback per array (#27 pass 33)
        shown = printable(where)
        _check(byte is None, f"run.name / run.dir: the run directory {shown} holds the byte {byte}, which is not UTF-8 "
               f"text, and the checkpoint library cannot open such a path; rename it in UTF-8")
        long = too_long(Path(where), "run.name / run.dir")
        _check(long is None, long or "")


@dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        for key in ("data", "fsdp", "tensor"):
            v = getattr(self, key)
            _check(v == -1 or v >= 1, f"mesh.{key} must be >= 1 or -1 (fill), got {v}")


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
        return Path(self.run.dir).expanduser() / self.run.name  # ~ as a shell reads it (a YAML value keeps it literal)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Raise ConfigError on the first impossible setting."""
        # a seed past 32 bits was a traceback from JAX's key, after the run directory was written
        _check(0 <= self.seed < 2**32, f"seed must be in 0..{2**32 - 1}, got {self.seed}")
        self.run.validate()
        self.model.validate()
        self.data.validate()
        self.train.validate(self.data.batch_size)
        self.eval.validate([c.name for c in self.model.circuits()])
        self.mesh.validate()
        self._validate_routes()
        self._validate_per_difficulty()
        self._validate_progressive()
        self._validate_iteration_loss()
        self._validate_stage()

    def _validate_stage(self) -> None:
        """train.stage=gate trains the halting head of an Ouro or PonderNet circuit, nothing else."""
        if self.train.stage != "gate":
            return
        c = self.model.halting_circuit()
        _check(c is not None, "train.stage=gate trains a halting head (Ouro stage II), but no circuit has one; set "
               "halting.kind=ouro on a circuit and train stage I first, or train.stage=all")
        _check(c.halting.rule().gate_stage, f"train.stage=gate: circuit {c.name}'s halting.kind={c.halting.kind} "
               "reads its head as halting mass, not an exit probability per step; stage II needs ouro or pondernet")
        why = ("train.progressive is on" if self.train.progressive else
               "data.mixture routes gradients" if self.data.routed else "")
        _check(not why, f"train.stage=gate freezes everything but the halting head, but {why}; turn it off")

    def progressive_circuits(self) -> list[str]:
        """The circuits the progressive loss truncates: train.progressive_circuits, or every circuit whose
        training count varies (not fixed(n)), or if none does every circuit that loops (fixed(n), n > 1);
        [] when train.progressive is 0."""
        if not self.train.progressive:
            return []
        return list(self.train.progressive_circuits) or self._looping_circuits()

    def _looping_circuits(self) -> list[str]:
        """The circuits a loop recipe applies to by default: every circuit whose training count varies (not
        fixed(n)), or if none does every circuit that loops (fixed(n), n > 1)."""
        circuits = self.model.circuits()
        return ([c.name for c in circuits if c.distribution().kind != "fixed"]
                or [c.name for c in circuits if c.distribution().typical_range()[1] > 1])

    def _validate_progressive(self) -> None:
        if not self.train.progressive:
            return
        circuits = [c.name for c in self.model.circuits()]
        _check_once(self.train.progressive_circuits, "train.progressive_circuits")
        for name in self.train.progressive_circuits:
            _check(name in circuits, f"train.progressive_circuits: '{name}' is not a circuit; circuits are "
                   f"{', '.join(circuits) or 'none'}")
        _check(bool(self.progressive_circuits()), "train.progressive: no circuit loops (every one runs fixed(1)), so "
               "there is nothing to truncate; set train.progressive=0")
        why = ("a circuit has a halting head" if self.model.halting_circuit() is not None else
               "a stage has a router" if any(s.router.routes for s in self.model.stages) else
               "data.mixture routes gradients" if self.data.routed else "")
        _check(not why, f"train.progressive: the progressive loss truncates loops at random counts, but {why} (its "
               f"loss terms read the full count); set train.progressive=0")

    def iteration_window(self) -> tuple[str, int] | None:
        """(circuit, W) of the loss at each of the last W iterations (train.iteration_loss), or None when off.
        The circuit is `_iterated_circuit`."""
        W = self.train.iteration_loss
        return None if not W else (self._iterated_circuit("train.iteration_loss"), W)

    def settle_term(self) -> tuple[str, int, float] | None:
        """(circuit, N, weight) of the settling loss (train.settle, train.settle_loops), or None when off. The
        circuit is `_iterated_circuit`."""
        t = self.train
        return None if not t.settle else (self._iterated_circuit("train.settle"), t.settle_loops, t.settle)

    def _iterated_circuit(self, field: str) -> str:
        """The circuit whose iterations ``field`` reads: train.iteration_loss_circuit, or the one whose training
        count varies, or the one that loops (ConfigError when that is not exactly one)."""
        if self.train.iteration_loss_circuit:
            return self.train.iteration_loss_circuit
        names = self._looping_circuits()
        _check(len(names) == 1, f"{field}: it reads one circuit's iterations, and "
               f"{'no circuit loops' if not names else 'circuits ' + ', '.join(names) + ' all loop'}; "
               + (f"set {field}=0" if not names else f"name one: train.iteration_loss_circuit={names[0]}"))
        return names[0]

    def _iterations_read_why(self, routed: str = "") -> str:
        """Why no term may read a circuit's last iterations (it has its own loss over them), or "". ``routed``: the
        circuit whose iterations the term reads may be a routed bank's (the iteration loss reads the bank's last
        rounds); a router in any other stage is refused."""
        routers = [[c.name for c in s.circuits] for s in self.model.stages if s.router.routes]
        return ("a circuit has a halting head" if self.model.halting_circuit() is not None else
                "a stage has a router" if routers and not (routed and all(routed in r for r in routers)) else
                "data.mixture routes gradients" if self.data.routed else
                "train.progressive is on" if self.train.progressive else
                "train.stage=gate" if self.train.stage == "gate" else "")

    def _validate_iteration_loss(self) -> None:
        """train.iteration_loss and train.settle: the circuit they read, and the iterations with gradient."""
        names = [c.name for c in self.model.circuits()]
        name = self.train.iteration_loss_circuit
        on = [f for f in ("iteration_loss", "settle") if getattr(self.train, f)]
        # (the circuit may stay named: both terms off)
        _check(not on or not name or name in names, f"train.iteration_loss_circuit: '{name}' is not a circuit; "
               f"circuits are {', '.join(names) or 'none'}; name one, or turn the terms off: "
               + " ".join(f"train.{f}=0" for f in on))
        window = self.iteration_window()
        windowed = None if window is None else self.model.stage_of(window[0])
        for i, stage in enumerate(self.model.stages):  # a setting that nothing reads is refused, as elsewhere
            _check(stage.router.window == "bank" or i == windowed,
                   f"model.stages.{i}.router.window={stage.router.window} chooses the rounds train.iteration_loss "
                   f"reads on this stage, but " + ("train.iteration_loss is off" if window is None else
                                                   f"it reads circuit {window[0]} of stage {windowed}")
                   + "; drop it, or set train.iteration_loss (and train.iteration_loss_circuit)")
        if not on:
            return
        if window is not None:
            name, W = window
            i = self.model.stage_of(name)
            router = self.model.stages[i].router
            # a window past the iterations that can run read nothing more, and kept the logits after each of its W
            # (train.iteration_loss=5000 on a routed stage of 16 rounds: a 126 GB out-of-memory traceback; #27 pass 41)
            cap = max(c.max_loops for c in self.model.stages[i].circuits) if router.routes else \
                self.model.circuit(name).max_loops
            what = f"circuit {name}'s routed stage runs at most {cap} rounds" if router.routes else \
                f"circuit {name} runs at most {cap} iterations"
            _check(cap >= W, f"train.iteration_loss={W}: {what} ({self.model.circuit_field(name, 'max_loops')}), so "
                   f"a window past them reads nothing more, and keeps the logits after each of its {W}; use "
                   f"train.iteration_loss<={cap}")
            if router.routes:  # a routed bank's last W rounds: its router's truncation, per token (0: every round)
                k, where = router.backprop or W, f"model.stages.{i}.router.backprop"
                _check(k >= W, f"train.iteration_loss={W}: the window must lie in the rounds with gradient of circuit "
                       f"{name}'s routed stage ({where}={k}); use train.iteration_loss<={k}, or raise {where} (0: every "
                       f"round)")
            else:
                k = self.model.circuit(name).backprop
                _check(k >= W, f"train.iteration_loss={W}: the window must lie in circuit {name}'s iterations with "
                       f"gradient (its backprop, {k}); use train.iteration_loss<={k} or raise "
                       f"{self.model.circuit_field(name, 'backprop')}")
            why = self._iterations_read_why(routed=name)
            _check(not why, f"train.iteration_loss reads the logits after each of the last iterations, but {why} (it "
                   f"has its own loss over the iterations); set train.iteration_loss=0")
        if self.train.settle:
            name, N, _ = self.settle_term()
            k = self.model.circuit(name).backprop
            _check(N >= 2, f"train.settle={self.train.settle} needs train.settle_loops, the count at which circuit "
                   f"{name}'s state must be at rest, e.g. twice its max_loops "
                   f"(train.settle_loops={min(2 * self.model.circuit(name).max_loops, MAX_LOOPS)})")
            _check(k >= 2, f"train.settle compares circuit {name}'s last two iterations, which need gradient (its "
                   f"backprop is {k}); raise {self.model.circuit_field(name, 'backprop')} to 2 or more")
            why = self._iterations_read_why()
            _check(not why, f"train.settle reads the states of the last iterations, but {why} (it has its own loss "
                   f"over the iterations); set train.settle=0")

    def training_ranges(self) -> list[tuple[tuple[int, int], float]]:
        """The difficulty ranges training draws from, each with its weight ([] for text): data.train_difficulty, or
        a mixture's task entries' by their weights (a curriculum's earlier ranges not included)."""
        d = self.data
        if d.mixture:
            return [((int(e.train_difficulty[0]), int(e.train_difficulty[1])), float(e.weight)) for e in d.mixture
                    if e.task != "text"]
        return [] if d.task == "text" else [((int(d.train_difficulty[0]), int(d.train_difficulty[1])), 1.0)]

    def _validate_per_difficulty(self) -> None:
        """per_difficulty loops read each example's difficulty: a synthetic task, and max_loops reaching the
        largest training count."""
        his = [hi for (_, hi), _ in self.training_ranges()]
        for s, stage in enumerate(self.model.stages):
            for c in stage.circuits:
                dist = c.distribution()
                if not dist.per_example:
                    continue
                p = f"model.stages.{s}.circuits.{c.name}.loops"
                _check(bool(his) and not (self.data.mixture and any(e.task == "text" for e in self.data.mixture)),
                       f"{p}={dist}: counts per difficulty need a synthetic task (text has no difficulty); "
                       f"use fixed, uniform or poisson_lognormal")
                # a routed stage reads per-token counts as each token's cap on its rounds, a halting head as
                # the step where the rest of each token's exit distribution falls
                top = dist.at(max(his))
                _check(top <= MAX_LOOPS, f"{p}={dist} gives {top} loops at difficulty {max(his)} (the training range's "
                       f"hi), past the limit of {MAX_LOOPS}; lower loops")
                _check(c.max_loops >= top, f"{p}={dist} gives {top} loops at difficulty {max(his)} (the training "
                       f"range's hi), above max_loops={c.max_loops}; raise max_loops to >= {top}")

    def _validate_routes(self) -> None:
        """Routes name circuits of the model; routing splits the loss by example, which the batch-level
        terms of halting heads and routers do not allow."""
        if not self.data.routed:
            return
        circuits = [c.name for c in self.model.circuits()]
        for e in self.data.mixture:
            for name in e.route or ():
                _check(name in circuits, f"data.mixture.{e.name}.route: '{name}' is not a circuit; circuits are "
                       f"{', '.join(circuits) or 'none'}")
        extra = ([f"circuit {c.name} has a halting head" for c in self.model.circuits() if c.halting.has_head]
                 + [f"stage {s} has a router" for s, st in enumerate(self.model.stages) if st.router.routes])
        _check(not extra, f"data.mixture: gradient routing (route) splits the loss example by example, but "
               f"{extra[0] if extra else ''} (its loss terms are batch-level); drop route, or set halting.kind=none "
               f"/ router.kind=none")
