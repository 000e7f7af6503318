"""Decoding speed and exactness: cached decoding (each cache policy) against recomputing the whole prefix
for every new token, on the `configs/text_bytes.yaml` model shape with random weights (kernels ~
N(0, 1/fan_in), so every layer and loop moves the logits; speed does not depend on the weights).

    python bench/decode.py [--json] [--out FILE] [--loops 3] [--new 64,256,1024] [--batch 1,8]

Per policy, batch and number of new tokens: greedy tokens/s (compile excluded: each program runs once
before it is timed; best of --reps). The recompute path (`loopformer generate --no-cache`) is timed only
up to --recompute-max new tokens (its cost grows with the square of the length). Exactness: the largest
absolute difference between the full-policy cached logits and the recomputed ones along a greedy
generation (teacher-forced on the recomputed tokens), and whether the greedy tokens match.

Per-token exits while decoding: `latent_diff` at three thresholds against none, the loop count capped at 8, at
batch 1 (an exit saves its iterations) and batch 8 (a row waits for the batch's slowest token); on the random
weights by default (their states never settle, so no token exits early) or on a trained text run (``--run``).

Compacted against masked decoding with exits (`Decoder(..., compact=True)`: the prefill and every step compute
only the rows and tokens still running; one-block circuits only, so the model here is the text_bytes.yaml shape
with X of depth 1, random weights): per batch (--compact-batch) and threshold, tokens/s of each mode, the mean
loops, the executed token-iterations of X per generated token (prefill included) and whether the greedy tokens
match. ``--compact-only`` runs this part alone.

JSON: {"rows": [{"policy", "batch", "new_tokens", "tokens_per_s", "bytes_per_token"}], "speedup_256": float,
       "max_abs_logit_diff": float, "greedy_match": bool, "approximations": {policy: max_abs_logit_diff},
       "exits": [{"exit", "batch", "new_tokens", "tokens_per_s", "mean_loops"}],
       "compact": [{"exit", "batch", "new_tokens", "mode", "tokens_per_s", "mean_loops", "computed_per_token",
                    "greedy_match"}]}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from loopformer.config import load_config  # noqa: E402
from loopformer.config.schema import MAX_LOOPS  # noqa: E402
from loopformer.evaluation.run import load_run  # noqa: E402
from loopformer.inference.decode import Decoder  # noqa: E402
from loopformer.inference.generate import generate_batch, logits_fn  # noqa: E402
from loopformer.model.transformer import build_model  # noqa: E402
from loopformer.runs.read import read_run  # noqa: E402
from loopformer.variants.cache import CachePolicy  # noqa: E402
from loopformer.variants.exits import ExitRule  # noqa: E402

POLICIES = ("full", "last", "ring:2", "first")
PROMPT = 16  # prompt tokens


def random_model() -> Any:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "text_bytes.yaml").model
    return C.random_kernels(build_model(cfg, 259, 0))


def prompts(batch: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, 259, PROMPT - 1).tolist()] for _ in range(batch)]


def best_time(fn: Any, reps: int) -> float:
    fn()  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = C.parser(C.about(__doc__))
    p.add_argument("--loops", type=int, default=3, help="the circuit's loop count (text_bytes.yaml: eval_loops 3)")
    p.add_argument("--new", default="64,256,1024", help="numbers of new tokens")
    p.add_argument("--batch", default="1,8", help="batch sizes")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (best kept)")
    p.add_argument("--run", help="measure the exits on this trained text run (e.g. runs/text_bytes) instead of the "
                                 "random weights, whose states never settle")
    p.add_argument("--recompute-max", type=int, default=256, help="largest number of new tokens timed for recompute")
    p.add_argument("--compact-batch", default="8,32", help="batch sizes of the compacted-against-masked exit rows")
    p.add_argument("--compact-only", action="store_true", help="measure only compacted against masked decoding")
    args = p.parse_args()
    C.at_least(p, args, {"--loops": 1, "--reps": 1, "--recompute-max": 0})
    C.at_most(p, args, {"--loops": (MAX_LOOPS, "the loop limit"), "--reps": C.REPS})
    news, batches = C.int_list(p, "--new", args.new), C.int_list(p, "--batch", args.batch)
    compact_batches = C.int_list(p, "--compact-batch", args.compact_batch)
    unused = [f"--{d.replace('_', '-')}" for d in ("run", "new", "batch", "loops", "recompute_max")
              if getattr(args, d) != p.get_default(d)]
    if args.compact_only and unused:  # accepted and not read: the rows were of random weights, whatever --run said
        p.error(f"--compact-only measures its own rows alone (random weights, {EXIT_NEW} new tokens, batches "
                f"--compact-batch), so {' and '.join(unused)} would not be used; drop them, or drop --compact-only")
    # before the policy rows (minutes): a run that is missing or not a text run failed after them; --run '' (an unset
    # variable) is refused there too (it measured the random weights, as if no --run had been given)
    if args.run == "":
        p.error("--run '': name the trained text run (e.g. runs/text_bytes), or leave --run out to measure the "
                "random weights")
    if args.run:
        info = read_run(args.run)
        if not info.is_text:
            p.error(f"--run {args.run}: a text run is needed (its val split gives the prompts), and it trains on "
                    f"the task '{info.cfg.data.task}'")
        if not info.circuits:  # an IndexError traceback at the exit rows, after every policy row (#27 pass 33)
            p.error(f"--run {args.run}: a run with a looped circuit is needed (its tokens' exits are measured), and "
                    f"it has none (model.stages: [])")
        if info.cfg.data.seq_len < PROMPT:  # its windows were cut into shorter prompts, recorded as PROMPT tokens
            p.error(f"--run {args.run}: its windows (data.seq_len {info.cfg.data.seq_len}) are shorter than the "
                    f"{PROMPT}-token prompts measured; give a run with data.seq_len >= {PROMPT}")
    exit_model = compact_model()  # a huge --compact-batch was found after the policy rows (minutes), by XLA
    per_exit = exit_model.empty_cache(1, 1, CachePolicy.parse("full"), {"X": EXIT_CAP}).nbytes_per_token()
    C.fits_memory(p, "--compact-batch", max(compact_batches), lambda b: b * per_exit * (PROMPT + EXIT_NEW),
                  f"the key/value cache of {max(compact_batches):,} prompts at {EXIT_CAP} loops")
    if args.compact_only:
        result = {"bench": "decode", "env": C.environment(), "prompt_tokens": PROMPT,
                  "compact": compact_rows(compact_batches, args, exit_model)}
        C.emit(result, [compact_table(result["compact"])], args)
        return
    model = random_model()
    # before anything runs: a huge --new, --batch or --loops was an out-of-memory traceback from XLA (the full
    # cache holds every iteration's keys and values of every token)
    per_token = max(model.empty_cache(1, 1, CachePolicy.parse(policy), {"X": args.loops}).nbytes_per_token()
                    for policy in POLICIES)
    C.fits_memory(p, "--batch", max(batches), lambda b: b * per_token * (PROMPT + 1),
                  f"the key/value cache of {max(batches):,} prompts at {args.loops} loops")
    C.fits_memory(p, "--new", max(news), lambda n: max(batches) * per_token * (PROMPT + n),
                  f"the key/value cache of {max(batches):,} x {PROMPT + max(news):,} tokens at {args.loops} loops")
    graphdef, params = nnx.graphdef(model), nnx.state(model)
    loops = {"X": args.loops}
    result: dict[str, Any] = {"bench": "decode", "env": C.environment(), "loops": args.loops, "prompt_tokens": PROMPT,
                              "weights": "random (kernels ~ N(0, 1/fan_in))", "rows": []}
    recompute = logits_fn(model)
    for batch in batches:
        for new in news:
            ps = prompts(batch)
            for policy in POLICIES:
                dec = Decoder(graphdef, model.circuit_names, policy)
                t = best_time(lambda dec=dec, ps=ps, new=new: dec(params, ps, loops, new), args.reps)
                cache = model.empty_cache(1, 1, CachePolicy.parse(policy), loops)
                row = {"policy": policy, "batch": batch, "new_tokens": new, "tokens_per_s": batch * new / t,
                       "bytes_per_token": cache.nbytes_per_token(), "seconds": t}
                result["rows"].append(row)
                C.log(f"batch {batch} new {new} {policy}: {row['tokens_per_s']:.0f} tok/s", args)
            if new <= args.recompute_max:
                t = best_time(lambda ps=ps, new=new: generate_batch(recompute, params, ps, loops, new),
                              max(1, args.reps - 1))
                result["rows"].append({"policy": "recompute", "batch": batch, "new_tokens": new,
                                       "tokens_per_s": batch * new / t, "bytes_per_token": 0, "seconds": t})
                C.log(f"batch {batch} new {new} recompute: {batch * new / t:.0f} tok/s", args)
    result["exits"] = exit_rows(model, graphdef, params, args)
    result["exits_weights"] = "random" if not args.run else f"trained: {args.run}"
    at = {(r["policy"], r["batch"], r["new_tokens"]): r["tokens_per_s"] for r in result["rows"]}
    result["speedup_256"] = (at[("full", 1, 256)] / at[("recompute", 1, 256)]
                             if ("recompute", 1, 256) in at and ("full", 1, 256) in at else None)
    # exactness along a greedy generation of 256 tokens (batch 2, prompts of different lengths)
    ps = [prompts(1)[0], prompts(1, seed=1)[0][:9]]
    ref = np.asarray(generate_batch(recompute, params, ps, loops, 256))
    full = recompute(params, *_buffer(ps, ref), loops)
    want = np.stack([np.asarray(full)[i, len(q) - 1: len(q) - 1 + 256] for i, q in enumerate(ps)])
    result["approximations"] = {}
    for policy in POLICIES:
        got = Decoder(graphdef, model.circuit_names, policy).score(params, ps, ref, loops)
        diff = float(np.abs(got - want).max())
        if policy == "full":
            result["max_abs_logit_diff"] = diff
            result["greedy_match"] = Decoder(graphdef, model.circuit_names, "full")(
                params, ps, loops, 256).tokens.tolist() == ref.tolist()
        else:
            result["approximations"][policy] = diff
    tables = [C.table(f"decode (text_bytes.yaml shape, random weights, {args.loops} loops, prompt {PROMPT} tokens; "
                      f"tokens/s, compile excluded)", ["policy", "batch", "new tokens", "tokens/s", "cache bytes/token"],
                      [[r["policy"], r["batch"], r["new_tokens"], r["tokens_per_s"], r["bytes_per_token"]]
                       for r in result["rows"]]),
              f"speedup_256 (full cache / recompute, batch 1): {result['speedup_256']}\n"
              f"max |logit difference| full cache vs recompute over 256 greedy tokens: {result['max_abs_logit_diff']:.2e}; "
              f"greedy tokens match: {result['greedy_match']}\n"
              "approximations (max |logit difference|): "
              + ", ".join(f"{k} {v:.3g}" for k, v in result["approximations"].items()),
              C.table(f"per-token exits while decoding (full cache, cap {EXIT_CAP} loops, {EXIT_NEW} new tokens; "
                      + ("random weights: where a token exits says nothing about text, the speed does)" if not args.run
                         else f"weights of {args.run}; prompts from its val split)"),
                      ["exit", "batch", "tokens/s", "mean loops per token"],
                      [[r["exit"], r["batch"], r["tokens_per_s"], r["mean_loops"]] for r in result["exits"]])]
    result["compact"] = compact_rows(compact_batches, args, exit_model)
    C.emit(result, [*tables, compact_table(result["compact"])], args)


EXIT_CAP, EXIT_NEW = 8, 256
EXIT_RULES = ("none", "latent_diff:0.1", "latent_diff:0.03", "latent_diff:0.01")


def exit_rows(model: Any, graphdef: Any, params: Any, args: Any) -> list[dict]:
    """Tokens/s and the mean iterations a generated token ran, with per-token exits (`latent_diff`) capped at
    EXIT_CAP loops, at batch 1 (where an exit saves its iterations) and batch 8 (where a row waits for the
    batch's slowest token: Huginn's caveat)."""
    rows = []
    circuit = "X"
    if args.run:  # a trained model: where its tokens exit means something; prompts from its own val text
        run = load_run(read_run(args.run))
        model, params, circuit = run.model, run.params, run.info.circuits[0]
        graphdef = nnx.graphdef(model)
        # the val windows of every batch (a run's eval batches may hold fewer than 8: an IndexError, #27 pass 33)
        val = np.concatenate([np.asarray(b["inputs"])[np.asarray(b["mask"]).sum(-1) > 0]
                              for b in run.eval_sets(["val"], 8)["val"]])
        if len(val) < 8:
            raise C.AnalysisError(f"--run {args.run}: its val split holds {len(val)} windows, and the exit rows "
                                  f"take prompts from 8")
    for batch in (1, 8):
        ps = prompts(batch) if not args.run else [[int(t) for t in val[i, :PROMPT]] for i in range(batch)]
        dec = Decoder(graphdef, model.circuit_names, "full")
        for rule in EXIT_RULES:
            exits = None if rule == "none" else {circuit: ExitRule.parse(rule)}
            def go(dec=dec, ps=ps, exits=exits):  # noqa: ANN202
                return dec(params, ps, {circuit: EXIT_CAP}, EXIT_NEW, exits=exits)
            t = best_time(go, args.reps)
            used = go().loops[circuit]
            rows.append({"exit": rule, "batch": batch, "new_tokens": EXIT_NEW, "tokens_per_s": batch * EXIT_NEW / t,
                         "mean_loops": float(np.mean(used)), "seconds": t})
            C.log(f"exits batch {batch} {rule}: {rows[-1]['tokens_per_s']:.0f} tok/s, {rows[-1]['mean_loops']:.2f} loops",
                  args)
    return rows


def compact_model() -> Any:
    """The model of `compact_rows`: the text_bytes.yaml shape with X of depth 1, random weights."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "text_bytes.yaml",
                      ["model.stages.0.circuits.X.depth=1"]).model
    return C.random_kernels(build_model(cfg, 259, 0))


def compact_rows(batches: list[int], args: Any, model: Any) -> list[dict]:
    """Masked (compact off) against compacted (on) cached decoding with exits, on a one-block circuit
    (`compact_model`), EXIT_NEW greedy tokens capped at EXIT_CAP loops."""
    graphdef, params = nnx.graphdef(model), nnx.state(model)
    rows = []
    for batch in batches:
        ps = prompts(batch)
        dec = Decoder(graphdef, model.circuit_names, "full")
        for rule in EXIT_RULES[1:]:
            tokens = {}
            for mode, compact in (("off", False), ("on", True)):
                def go(dec=dec, ps=ps, rule=rule, compact=compact):  # noqa: ANN202
                    return dec(params, ps, {"X": EXIT_CAP}, EXIT_NEW, exits={"X": ExitRule.parse(rule)}, compact=compact)
                t = best_time(go, args.reps)
                out = go()
                tokens[mode] = out.tokens.tolist()
                rows.append({"exit": rule, "batch": batch, "new_tokens": EXIT_NEW, "mode": mode,
                             "tokens_per_s": batch * EXIT_NEW / t, "mean_loops": float(np.mean(out.loops["X"])),
                             "computed_per_token": out.computed["X"] / (batch * EXIT_NEW), "seconds": t})
                C.log(f"compact {mode} batch {batch} {rule}: {rows[-1]['tokens_per_s']:.0f} tok/s, "
                      f"{rows[-1]['computed_per_token']:.2f} computed per token", args)
            for r in rows[-2:]:
                r["greedy_match"] = tokens["on"] == tokens["off"]
    return rows


def compact_table(rows: list[dict]) -> str:
    return C.table(f"compacted against masked decoding with exits (text_bytes.yaml shape, X of depth 1, random "
                   f"weights, cap {EXIT_CAP} loops, {EXIT_NEW} new tokens; computed: X's token-iterations per new "
                   f"token, prefill included)",
                   ["exit", "batch", "compact", "tokens/s", "mean loops", "computed", "same tokens"],
                   [[r["exit"], r["batch"], r["mode"], r["tokens_per_s"], r["mean_loops"], r["computed_per_token"],
                     r["greedy_match"]] for r in rows])


def _buffer(ps: list[list[int]], new: np.ndarray) -> tuple[np.ndarray]:
    """The recompute path's view: each prompt followed by its generated tokens, in one [B, L] buffer."""
    L = -(-(max(len(q) for q in ps) + new.shape[1]) // 32) * 32
    buf = np.zeros((len(ps), L), np.int32)
    for i, q in enumerate(ps):
        buf[i, : len(q)] = q
        buf[i, len(q): len(q) + new.shape[1]] = new[i]
    return (jax.numpy.asarray(buf),)


if __name__ == "__main__":
    C.run_main(main)
