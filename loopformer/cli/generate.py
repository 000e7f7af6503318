"""``loopformer generate``: a run's answers at chosen loop counts (synthetic examples, or a text prompt)."""

from __future__ import annotations

import argparse
import math
import shlex
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loopformer.cli.common import (
    command,
    compact_choice,
    compact_note,
    emit,
    exit_caps,
    exit_flags,
    integer,
    positive,
    real,
    run_flags,
)
from loopformer.cli.loopspec import parse_exits, parse_loops
from loopformer.errors import AnalysisError, PlanError
from loopformer.evaluation import sweep, tables
from loopformer.evaluation.run import LoadedRun, load_run, real_rows
from loopformer.inference.decode import Sampling, decoder_for
from loopformer.inference.generate import answer_examples, generate_batch, prompt_ids, tokenizer_of, until_eos
from loopformer.model.attend import attention_overflow, memory_bytes
from loopformer.model.plan import MAX_LOOPS
from loopformer.runs.read import read_run
from loopformer.variants.cache import CachePolicy
from loopformer.variants.exits import refuse_uncached

MAX_SETTINGS = 16
MAX_TEMPERATURE = 1e30  # logits are divided by it in float32: 1e300 was inf (numpy's overflow warning on stderr)
MAX_COUNT = 1000  # examples shown: each is printed with its answers at every setting


def _args(p: argparse.ArgumentParser) -> None:
    run_flags(p, examples=False)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=SPEC",
                   help=f"loop counts (1..{MAX_LOOPS}), e.g. X=32; a list or range (X=2,6,32) answers at each count, "
                        f"side by side")
    p.add_argument("--example-split", metavar="NAME",
                   help="synthetic tasks: answer examples of this eval split (default: the first split)")
    p.add_argument("--count", type=positive, metavar="K", help="synthetic tasks: examples to show (default 4)")
    p.add_argument("--prompt", metavar="TEXT", help="text runs: continue this prompt")
    p.add_argument("--max-new-tokens", type=positive, metavar="N", help="--prompt: tokens to generate (default 64)")
    p.add_argument("--temperature", type=real, default=0.0, help="--prompt: 0 = greedy (default), > 0 samples")
    p.add_argument("--top-k", type=integer, default=0, metavar="K", help="--prompt: sample among the K likeliest (0 = all)")
    p.add_argument("--top-p", type=real, default=1.0, metavar="P",
                   help="--prompt: sample among the likeliest tokens holding probability P (1 = all)")
    p.add_argument("--seed", type=integer, default=0, help="--prompt: sampling seed")
    p.add_argument("--cache", metavar="POLICY",
                   help="key/value cache of the loop iterations (text prompts; answers of causal tasks): full (exact), "
                        "last, ring:K or first (default full)")
    p.add_argument("--continuous", action="store_true",
                   help="with the cache: start each new token's circuits from the previous token's final state")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole prefix for every new token (the reference)")
    exit_flags(p, many=False)  # --compact: the prefill and every step of cached decoding (and --no-cache)


def _format_examples(examples: list[dict[str, Any]]) -> str:
    lines = []
    for ex in examples:
        lines.append(f"#{ex['index']}  " + ex["prompt"].replace("\n", "\n" + " " * (len(str(ex["index"])) + 3)))
        truth = ex["answer"]
        rows = [["true answer", truth["text"], " ".join(map(str, truth["tokens"])), ""]]
        rows += [[tables.loops_str(p["loops"]), p["text"], " ".join(map(str, p["tokens"])), "✓" if p["correct"] else "✗"]
                 for p in ex["predictions"]]
        lines += ["    " + line for line in tables.format_table(["loops", "answer", "token ids", ""], rows).splitlines()]
    return "\n".join(lines)


@command("generate", "show a run's answers at chosen loop counts (synthetic examples, or --prompt for text runs)",
         _args)
def generate_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        points = sweep.grid_points(parse_loops(args.loops, info.circuits, grid=True))
        if len(points) > MAX_SETTINGS:
            raise PlanError(f"--loops asks for {len(points)} settings; generate shows at most {MAX_SETTINGS} side by "
                            f"side (use `loopformer sweep` for more)")
        if args.prompt is not None and args.example_split is not None:
            raise AnalysisError("give either --prompt TEXT or --example-split NAME, not both")
        if not 0 <= args.seed < 2**32:
            raise AnalysisError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
        if args.prompt is not None:
            try:
                args.prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
                bad = args.prompt[e.start].encode("utf-8", "surrogateescape")
                raise AnalysisError(f"--prompt is not UTF-8 text (byte 0x{bad.hex()} at character {e.start}); pass "
                                    f"the prompt in UTF-8") from None
        if not (math.isfinite(args.temperature) and args.temperature >= 0):
            raise AnalysisError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature:g}")
        if args.temperature > MAX_TEMPERATURE:
            raise AnalysisError(f"--temperature {args.temperature:g} is past the largest, {MAX_TEMPERATURE:g} (from "
                                f"about 100 on, every token is about equally likely)")
        if args.top_k < 0:  # (each was refused naming both flags)
            raise AnalysisError(f"--top-k must be >= 0 (0 = every token), got {args.top_k}")
        if not 0 < args.top_p <= 1:
            raise AnalysisError(f"--top-p must be in (0, 1] (1 = every token), got {args.top_p:g}")
        sampling = _given((("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0), ("--seed", args.seed != 0)))
        if args.temperature == 0 and sampling and args.prompt is not None:
            raise AnalysisError(f"{sampling} set(s) how tokens are sampled, and --temperature 0 (the default) decodes "
                                f"greedily; give --temperature > 0, or drop {sampling}")
        given = _given((("--cache", args.cache is not None), ("--continuous", args.continuous)))
        if args.no_cache and given:
            raise AnalysisError(f"--no-cache recomputes the whole prefix for every token, so {given} (settings of "
                                f"cached decoding) would do nothing; drop one or the other")
        args.policy = CachePolicy.parse("full" if args.cache is None else args.cache)  # --cache '' is no policy
        exits = (parse_exits(args.exit, info.circuits, many=False, max_loops=args.max_loops, heads=info.heads,
                             routed=info.routed) or [{}])[0]
        settings = [info.full_loops(exit_caps(info, exits, args.max_loops, p)) for p in points]
        args.exits = exits
        # a routed bank stops tokens by its router, and is compacted in a forward pass, not in cached decoding:
        # --compact applies to it where the answers (or --no-cache's prefixes) are recomputed (it was refused as
        # "none can" stop, though eval compacts the same pass)
        args.routed = args.no_cache or (not info.is_text and _recomputed_why(info, args) is not None)
        if (args.compact != "auto" and not args.routed and not compact_note(args, info, exits)
                and compact_note(args, info, exits, routed=True)):
            # "none can: add --exit" was said of a routed stage, whose --exit is refused in turn (#27 pass 38)
            raise AnalysisError(f"--compact {args.compact}: cached decoding does not compact a routed stage (its "
                                f"router stops tokens in a forward pass); add --no-cache (each prefix recomputed, "
                                f"compacted), or drop --compact")
        args.compact_plan = compact_choice(args, info, exits, how="--exit", routed=args.routed)
        if info.is_text:
            if args.prompt is None:
                raise AnalysisError(f"{info.path} trains on text: give --prompt TEXT to continue "
                                    f"(--example-split is for synthetic tasks)")
            if args.count is not None:
                raise AnalysisError(f"--count sets how many examples of a synthetic task are answered; {info.path} "
                                    f"trains on text and continues the one --prompt: drop --count")
            args.max_new_tokens = args.max_new_tokens or 64
            if not args.no_cache:  # before the checkpoint is read (the model layer refused it after, "loaded ..." above)
                refuse_uncached(exits)
            return _generate_text(args, load_run(info, args.step, raw=args.raw_weights), settings)
        if args.prompt is not None:
            what = ("a mixture (its entries' token ids share one vocabulary, so no one tokenizer encodes a prompt)"
                    if info.cfg.data.task == "mixture" else f"the synthetic task '{info.cfg.data.task}' (no tokenizer)")
            raise AnalysisError(f"--prompt needs a text run, but {info.path} trains on {what}; use --example-split "
                                f"NAME to see its examples answered (splits: {', '.join(info.splits)})")
        if args.count is not None and args.count > MAX_COUNT:
            raise AnalysisError(f"--count {args.count}: generate shows at most {MAX_COUNT} examples (use `loopformer "
                                f"eval --examples N` to score more)")
        if args.example_split is not None and args.example_split not in info.splits:
            raise AnalysisError(f"--example-split {shlex.quote(args.example_split)}: this run has no eval split "
                                f"'{args.example_split}'; its splits are {', '.join(info.splits)}")
        _refuse_text_flags(args, info)
        split = args.example_split or _first_answered(info)
        return _answer_examples(args, load_run(info, args.step, raw=args.raw_weights), settings, split)

    return emit(args, body)


def _first_answered(info: Any) -> str:
    """The split `generate` answers by default: the first one with answers (a mixture's text entries have none, and
    its first split may be one: the error then named an --example-split that was not given)."""
    data = info.data
    for split in info.splits:
        if not hasattr(data, "entry_of_split") or data.entries[data.entry_of_split(split)[0]].task is not None:
            return split
    raise AnalysisError(f"{info.path}: every eval split is a text entry's, whose windows have no answers to show; use "
                        f"`loopformer eval` (bits per byte)")


def _generate_text(args: argparse.Namespace, run: LoadedRun, settings: list[dict[str, int]]) -> tuple[dict, str]:
    tokenizer = tokenizer_of(run.info.data)
    if tokenizer is None:
        raise AnalysisError(f"{run.info.path}: its data source has no tokenizer to encode --prompt")
    ids = prompt_ids(tokenizer, args.prompt, run.info.cfg.data.prompt_format)
    _check_memory(args, run, len(ids), settings)
    sampling = Sampling(args.temperature, min(args.top_k, run.model.vocab_size), args.top_p)  # K >= vocab: all
    stops = list(run.info.cfg.data.stop_ids) or [tokenizer.eos_id]
    beyond = [i for i in stops if i >= run.model.vocab_size]
    if beyond:
        raise AnalysisError(f"data.stop_ids {beyond} are not token ids of this model (vocabulary {run.model.vocab_size}); "
                            f"edit data.stop_ids in {run.info.path}/config.yaml ([] stops at the tokenizer's end-of-text)")
    outs = []
    for loops in settings:
        if args.no_cache:
            ran: dict[str, np.ndarray] = {}
            new = generate_batch(_logits(run, args.exits, args.compact_plan, used=True), run.params, [ids], loops,
                                 args.max_new_tokens, seed=args.seed, sampling=sampling, ran=ran)[0]
            # over the new tokens up to and including the first stop, as cached decoding's lengths count them
            # (no mean loops were reported here: the line showed the rule beside the caps alone)
            n = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))
            mean_loops = {c: float(v[0, :n].mean()) for c, v in ran.items()}
        else:
            decoder = decoder_for(run.model, args.policy, args.continuous)
            out = decoder(run.params, [ids], loops, args.max_new_tokens, sampling, eos_id=stops,
                          exits=args.exits or None, compact=args.compact_plan, seed=args.seed)
            new = out.tokens[0, : out.lengths[0]].tolist()
            mean_loops = {c: float(v[0, : out.lengths[0]].mean()) for c, v in out.loops.items()}
        new = until_eos(tokenizer, new, stops)
        outs.append({"loops": loops, "text": tokenizer.decode(new), "tokens": new}
                    | ({"mean_loops": mean_loops} if mean_loops else {})
                    | ({"exit": _rules(args.exits)} if args.exits else {}))
    doc = {**run.provenance(), "prompt": args.prompt, "prompt_tokens": ids,
           "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
           "max_new_tokens": args.max_new_tokens,
           "cache": None if args.no_cache else str(args.policy), "continuous": args.continuous, "stop_ids": stops,
           "generations": outs} | compact_note(args, run.info, args.exits, routed=args.routed)
    return doc, "\n".join(f"[{tables.loops_str(o['loops'])}{_ran(o)}] {args.prompt}{o['text']}" for o in outs)


def _ran(generation: dict[str, Any]) -> str:
    """After the loop caps of a text generation with --exit: each exiting circuit's rule and its mean loops per token
    (the line showed the caps alone, as if every token ran them)."""
    if "exit" not in generation:
        return ""
    mean = generation.get("mean_loops", {})
    return "".join(f"; {c} exits by {r}" + (f", {mean[c]:.2f} loops per token" if c in mean else "")
                   for c, r in generation["exit"].items())


def _rules(exits: dict[str, Any]) -> dict[str, str]:
    return {c: str(r) for c, r in exits.items()}


def _exit_note(exits: dict[str, Any]) -> str:
    """What the header says of --exit: the loop counts shown for an exiting circuit are its cap, not what ran (a
    task run's answers showed "X=20" and no word of the rule, in the table and the JSON)."""
    if not exits:
        return ""
    return " · " + ", ".join(f"{c} exits by {r}" for c, r in _rules(exits).items()) + " (its count shown is the cap)"


def _given(flags: tuple[tuple[str, bool], ...]) -> str:
    """The flags of ``flags`` (name, whether it was given) that were given, as "--a and --b" ("" for none)."""
    return " and ".join(flag for flag, on in flags if on)


def _recomputed_why(info: Any, args: argparse.Namespace) -> str | None:
    """Why a task run's answers take the recompute path rather than cached decoding (None: they are cached)."""
    cfg = info.cfg
    return ("the model is bidirectional" if not cfg.model.causal else
            "a mixture's answers read a slice of the logits" if cfg.data.mixture else
            f"task '{cfg.data.task}' labels every input position (no answer is decoded token by token)"
            if info.data.task.labels_aligned else
            "an exit rule reads the output every iteration (kl, entropy_diff)"
            if any(rule.needs_readout for rule in args.exits.values()) else
            "an exit rule waits for the tokens before each token (context_diff)"
            if any(rule.reads_earlier for rule in args.exits.values()) else None)


def _refuse_text_flags(args: argparse.Namespace, info: Any) -> None:
    """AnalysisError for settings a synthetic-task run would accept and not use: those of prompt continuation
    (its answers are decoded greedily to the answer's length), and those of cached decoding where its answers
    are recomputed."""
    given = _given((("--max-new-tokens", args.max_new_tokens is not None), ("--temperature", args.temperature != 0.0),
                    ("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0), ("--seed", args.seed != 0)))
    if given:
        raise AnalysisError(f"{given} set(s) how a --prompt is continued, but {info.path} trains on the synthetic task "
                            f"'{info.cfg.data.task}', whose answers are decoded greedily to the answer's length; drop "
                            f"{given}")
    why = None if args.no_cache else _recomputed_why(info, args)
    given = _given((("--cache", args.cache is not None), ("--continuous", args.continuous)))
    if why is not None and given:
        raise AnalysisError(f"{given} set(s) cached decoding, but this run's answers are recomputed ({why}); drop "
                            f"{given}")
    why = _recomputed_why(info, args)
    if args.no_cache and why is not None:  # accepted and changed nothing (#27 pass 40's leftover)
        raise AnalysisError(f"--no-cache: this run's answers are recomputed in any case ({why}), so it would do "
                            f"nothing; drop --no-cache")


def _check_memory(args: argparse.Namespace, run: LoadedRun, prompt_len: int, settings: list[dict[str, int]]) -> None:
    """AnalysisError when the key/value cache of the prompt and --max-new-tokens would take more than half of
    this machine's memory (recomputing without a cache holds at least as much per token)."""
    policy = CachePolicy.parse("full") if args.no_cache else args.policy
    per_token = max(jax.eval_shape(lambda loops=loops: run.model.empty_cache(1, 1, policy, loops)).nbytes_per_token()
                    for loops in settings)
    memory = memory_bytes()
    # the prefill attends over the prompt; recomputation over the prompt and every new token
    span = prompt_len + (args.max_new_tokens if args.no_cache else 0)
    too_big = attention_overflow(1, span, run.info.cfg.model.max_heads)
    if too_big:
        raise AnalysisError(f"the prompt is {prompt_len:,} tokens"
                            + (f" and --no-cache recomputes {span:,}" if args.no_cache else "")
                            + f"; {too_big}; give a shorter prompt"
                            + (" or fewer --max-new-tokens" if args.no_cache else "")
                            + f" (the run trained on {run.info.cfg.data.seq_len:,})")
    fits = max(1, memory // 2 // max(per_token, 1) - prompt_len)
    if args.max_new_tokens > fits:
        need = per_token * (prompt_len + args.max_new_tokens)
        raise AnalysisError(f"--max-new-tokens {args.max_new_tokens} needs a {need / 2**30:,.1f} GiB key/value cache "
                            f"({per_token:,} bytes per token), more than half of this machine's "
                            f"{memory / 2**30:.0f} GiB; ask for at most {fits:,} tokens"
                            + ("" if args.no_cache or str(policy) == "last" else ", or keep fewer iterations with "
                               "--cache last"))


def _answer_examples(args: argparse.Namespace, run: LoadedRun, settings: list[dict[str, int]],
                     split: str) -> tuple[dict, str]:
    info, task, logits = run.info, run.task, _logits(run, args.exits, args.compact_plan)
    parts = [real_rows(b) for b in run.eval_sets([split], args.count or 4)[split]]
    if info.cfg.data.mixture:
        task, logits, parts = _mixture_view(run, split, logits, parts)
    batch = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    decode, cache = _answer_decoder(args, run)
    examples = answer_examples(logits, run.params, task, batch, settings, decode)
    for ex in examples:
        ex["split"] = split
    # a task with aligned labels is answered by one forward pass (argmax at each labelled position), not decoded
    aligned = task.labels_aligned
    doc = {**run.provenance(), "split": split, "decoding": "one pass, argmax per position" if aligned else
           "autoregressive greedy", "cache": cache, "continuous": args.continuous and cache is not None,
           "examples": examples} | ({"exit": _rules(args.exits)} if args.exits else {})
    doc |= compact_note(args, info, args.exits, routed=args.routed)
    how = ("answers read in one forward pass (argmax at each labelled position)" if aligned else
           "answers decoded greedily, token by token from the prompt (not teacher-forced)")
    head = (f"{info.path} @ step {run.step} · task {info.cfg.data.task} · split {tables.split_label(info, split)} · "
            f"{how}" + (_exit_note(args.exits) or tables.caps_note(info.cfg.model, info.circuits, " · {}")))
    return doc, head + "\n" + _format_examples(examples)


def _answer_decoder(args: argparse.Namespace, run: LoadedRun) -> tuple[Any, str | None]:
    """Cached greedy decoding for a causal single-task run's answers (and the policy's name), or (None, None):
    the recompute path, for --no-cache, a mixture (its answers read a slice of the logits) and exits that read
    the output every iteration (kl, entropy_diff: the cache supports latent_diff and learned)."""
    if args.no_cache or _recomputed_why(run.info, args) is not None:
        return None, None
    decoder = decoder_for(run.model, args.policy, args.continuous)

    def decode(params: Any, prompts: Any, loops: dict[str, int], n: int) -> list[list[int]]:
        return decoder(params, prompts, loops, n, exits=args.exits or None, compact=args.compact_plan).tokens.tolist()

    return decode, str(args.policy)


def _mixture_view(run: LoadedRun, split: str, logits_fn: Any, parts: list[dict]) -> tuple[Any, Any, list[dict]]:
    """A mixture run's split seen through its entry's own task and token ids: tokens move into the
    shared vocabulary on the way in, the logits are cut to the entry's id range on the way out."""
    data = run.info.data
    k, _ = data.entry_of_split(split)
    entry = data.entries[k]
    if entry.task is None:
        raise AnalysisError(f"--example-split {split}: a text entry's windows have no answers to show; use "
                            f"`loopformer eval --split {split}` (bits per byte)")
    off, size = data.offsets[k], entry.vocab_size

    def logits(params: Any, tokens: Any, loops: Any, segments: Any = None) -> Any:
        tokens = jnp.asarray(tokens)
        return logits_fn(params, jnp.where(tokens > 0, tokens + off, 0), loops, segments)[..., off:off + size]

    return entry.task, logits, [data.untag(b) for b in parts]


def _logits(run: LoadedRun, exits: dict[str, Any], compact: bool | None = None, used: bool = False) -> Any:
    """The evaluator's logits function, with the exit rules and --compact bound in (``used``: it returns the
    iterations each position ran beside the logits, `Evaluator.logits_used`)."""
    fn = run.evaluator.logits_used if used else run.evaluator.logits
    return lambda params, tokens, loops, segments=None: fn(params, tokens, loops, segments, exits, compact)
