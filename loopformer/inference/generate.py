"""Generation at chosen loop counts: continue token prompts, answer synthetic-task examples.

This is the recompute path, the reference that cached decoding (`loopformer.inference.decode`, what
`loopformer generate --prompt` uses unless ``--no-cache``) is tested against, and what answers the
synthetic tasks: it runs the full forward pass for every new token. The prompts sit in a
fixed [B, L] buffer (L = longest prompt + max_new_tokens rounded up to a multiple of 32, filled with
token 0 after each prompt), so one compiled program serves every step, every loop count and prompts
of similar length; causal attention keeps what follows a position from affecting it. A text corpus
plugs in through any object with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``
(`Tokenizer`); a synthetic task through ``render``/``answer``/``labels_aligned`` (`loopformer.data.tasks`).

The model runs through a ``logits_fn(params, tokens_BT, loops, segment_ids_BT) -> logits [B, T, V]``:
`loopformer.evaluation.evaluator.Evaluator.logits` (compiled once per model structure), or
`logits_fn(model)` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.errors import PlanError
from loopformer.inference.decode import Sampling, sample
from loopformer.model.plan import make_plan
from loopformer.model.transformer import LoopedTransformer

Array = jax.Array
LogitsFn = Callable[[Any, Array, Mapping[str, int], Array | None], Array]
LENGTH_BUCKET = 32  # buffer lengths are rounded up to a multiple of this: fewer distinct programs
FILL = 0  # token id in the buffer after each prompt (never read: attention is causal)


@runtime_checkable
class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def tokenizer_of(task: Any) -> Tokenizer | None:
    """The text tokenizer of a run's data source: ``task.tokenizer`` or the task itself when it has
    encode/decode; None for the synthetic tasks (they are read through ``task.render``)."""
    for candidate in (getattr(task, "tokenizer", None), task):
        if candidate is not None and isinstance(candidate, Tokenizer):
            return candidate
    return None


def logits_fn(model: LoopedTransformer) -> LogitsFn:
    """A jitted ``logits_fn`` of ``model``'s structure (compiled anew for each call of this function;
    the analysis commands share `Evaluator.logits` instead)."""
    graphdef, names = nnx.graphdef(model), list(model.circuit_names)

    @jax.jit
    def run(params: Any, tokens_BT: Array, plan: Any, segment_ids_BT: Array | None) -> Array:
        return nnx.merge(graphdef, params)(tokens_BT, plan, segment_ids_BT=segment_ids_BT)[0]

    return lambda params, tokens_BT, loops, segment_ids_BT=None: run(params, tokens_BT, make_plan(names, loops),
                                                                     segment_ids_BT)


def generate_batch(logits_fn: LogitsFn, params: Any, prompts: Sequence[Sequence[int]], loops: Mapping[str, int],
                   max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                   sampling: Sampling | None = None, ran: dict[str, np.ndarray] | None = None) -> list[list[int]]:
    """Append ``max_new_tokens`` tokens to each prompt (all decoded together) with every circuit at
    ``loops``; returns the new tokens.

    temperature 0 is greedy (argmax); > 0 samples (``sampling`` adds top-k / top-p, as
    `loopformer.inference.decode.sample`) with a key derived from ``seed``. Each new token costs one full
    forward over [B, L]: the reference for the cached `loopformer.inference.decode.Decoder`.
    ``ran`` (a dict, filled in): ``logits_fn`` then returns (logits, {circuit: iterations [B, L]}) and ``ran`` gets
    {circuit: float [B, max_new_tokens]}, the iterations that produced each new token (`Generated.loops`).
    """
    sampling = sampling or Sampling(temperature=temperature)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PlanError("every prompt needs at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    lengths = np.array([len(p) for p in prompts])
    width = -(-(int(lengths.max()) + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
    buf = np.full((len(prompts), width), FILL, np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    rows = np.arange(len(prompts))
    key = jax.random.key(seed)
    for t in range(max_new_tokens):
        logits = logits_fn(params, jnp.asarray(buf), loops, None)  # [B, L, V]
        if ran is not None:
            logits, used = logits
            for n, u in used.items():  # the position that predicts new token t
                ran.setdefault(n, np.zeros((len(prompts), max_new_tokens), np.float32))[:, t] = \
                    np.asarray(u)[rows, lengths + t - 1]
        nxt = sample(logits[rows, lengths + t - 1], jax.random.fold_in(key, t), sampling)
        buf[rows, lengths + t] = np.asarray(nxt)
    return [buf[i, lengths[i] : lengths[i] + max_new_tokens].tolist() for i in rows]


def prompt_ids(tokenizer: Tokenizer, prompt: str, prompt_format: str = "documents") -> list[int]:
    """The prompt's token ids. ``documents`` (data.prompt_format): documents are trained as ``BOS ids EOS``, so the
    prompt gets the tokenizer's ``bos_id`` in front when it has one; ``tokenizer``: the tokenizer.json's own
    post-processor decides (an imported model's prompts, as transformers encodes them)."""
    dropped = tokenizer.unencodable(prompt) if hasattr(tokenizer, "unencodable") else []
    if dropped:
        raise PlanError(f"--prompt: the run's tokenizer has no token for {', '.join(map(repr, dropped[:5]))}"
                        + (f" (and {len(dropped) - 5} more)" if len(dropped) > 5 else "")
                        + " and no unknown token, so they would be dropped silently; leave them out of the prompt")
    if prompt_format == "tokenizer" and hasattr(tokenizer, "encode_prompt"):
        ids = tokenizer.encode_prompt(prompt)
    else:
        bos = getattr(tokenizer, "bos_id", None)
        ids = ([bos] if bos is not None else []) + list(tokenizer.encode(prompt))
    if not ids:
        raise PlanError("--prompt encodes to no tokens; give a non-empty prompt")
    return ids


def until_eos(tokenizer: Tokenizer, ids: Sequence[int], stops: Sequence[int] | None = None) -> list[int]:
    """``ids`` up to (without) the first of ``stops`` (default: the tokenizer's ``eos_id``)."""
    stops = set(stops) if stops else {getattr(tokenizer, "eos_id", None)}
    ids = [int(i) for i in ids]
    return next((ids[:k] for k, i in enumerate(ids) if i in stops), ids)


def generate_text(logits_fn: LogitsFn, params: Any, tokenizer: Tokenizer, prompt: str, loops: Mapping[str, int],
                  max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """The decoded continuation of ``prompt`` (recomputing the prefix for every token), up to ``eos_id``."""
    new = generate_batch(logits_fn, params, [prompt_ids(tokenizer, prompt)], loops, max_new_tokens, temperature, seed)[0]
    return tokenizer.decode(until_eos(tokenizer, new))


# ----------------------------------------------------------------------------- synthetic tasks


def split_prompt(example: Mapping[str, np.ndarray]) -> tuple[list[int], int]:
    """The prompt tokens of one packed example (``inputs`` up to the first answer target) and its
    answer length: inputs[:a] predicts the first answer token at position a - 1."""
    mask = np.asarray(example["mask"]) > 0
    first = int(np.argmax(mask))
    return [int(t) for t in np.asarray(example["inputs"])[: first + 1]], int(mask.sum())


def answer_text(task: Any, inputs: np.ndarray, answer: Sequence[int]) -> str:
    """The answer part of ``task.render(inputs, answer)`` (the text replacing the '?' of the bare prompt)."""
    bare, full = task.render(inputs), task.render(inputs, list(answer))
    stem = bare[:-1] if bare.endswith("?") else bare
    return full[len(stem):] if full.startswith(stem) else full


DecodeFn = Callable[[Any, Sequence[Sequence[int]], Mapping[str, int], int], list[list[int]]]


def answer_examples(logits_fn: LogitsFn, params: Any, task: Any, examples: Mapping[str, np.ndarray],
                    settings: Sequence[Mapping[str, int]], decode: DecodeFn | None = None) -> list[dict[str, Any]]:
    """Autoregressive greedy answers to a batch of examples (``inputs``/``targets``/``mask`` [K, T], and
    ``segment_ids``) at each loop setting (every circuit's count); a task with aligned labels is
    answered by one forward pass instead. ``decode(params, prompts, loops, n)`` (a cached decoder's
    greedy tokens) replaces the recompute path when given. One dict per example: prompt (rendered), true
    answer (tokens, text) and one prediction (loops, tokens, text, correct) per setting."""
    inputs = np.asarray(examples["inputs"])
    parts = [split_prompt({k: np.asarray(v)[i] for k, v in examples.items()}) for i in range(len(inputs))]
    prompts, lengths = [p for p, _ in parts], [n for _, n in parts]
    out = []
    for i in range(len(inputs)):
        truth = task.answer({k: np.asarray(v)[i] for k, v in examples.items()})
        out.append({"index": i, "prompt": task.render(inputs[i]),
                    "answer": {"tokens": truth, "text": answer_text(task, inputs[i], truth)}, "predictions": []})
    mask = np.asarray(examples["mask"]) > 0
    segments = examples.get("segment_ids")
    for loops in settings:
        if task.labels_aligned:  # labels at input positions: one forward pass, argmax where mask
            seg = None if segments is None else jnp.asarray(segments)
            pred_BT = np.asarray(jnp.argmax(logits_fn(params, jnp.asarray(inputs), loops, seg), axis=-1))
            new = [pred_BT[i][mask[i]].tolist() for i in range(len(inputs))]
        elif decode is not None:
            new = decode(params, prompts, loops, max(lengths))
        else:
            new = generate_batch(logits_fn, params, prompts, loops, max(lengths))
        for i, ex in enumerate(out):
            pred = new[i][: lengths[i]]
            ex["predictions"].append({"loops": dict(loops), "tokens": pred, "text": answer_text(task, inputs[i], pred),
                                      "correct": pred == ex["answer"]["tokens"]})
    return out
