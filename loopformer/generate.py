"""Generation at chosen loop counts: continue token prompts, answer synthetic-task examples.

Decoding recomputes the full forward pass for every new token (no KV cache): the prompts sit in a
fixed [B, L] buffer (L = longest prompt + max_new_tokens rounded up to a multiple of 32,
right-padded with PAD), so one compiled program serves every step, every loop count and prompts of
similar length; causal attention keeps the padding from affecting the positions read. A text
corpus plugs in through any object with ``encode(str) -> list[int]`` and
``decode(list[int]) -> str`` (`Tokenizer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.analysis.loopspec import LoopSpecError
from loopformer.data.tasks import PAD, Task
from loopformer.model.transformer import LoopedTransformer

Array = jax.Array
LogitsFn = Callable[[Any, Array, Array], Array]
LENGTH_BUCKET = 32  # buffer lengths are rounded up to a multiple of this: fewer distinct programs


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


_LOGITS_FNS: dict[str, LogitsFn] = {}


def make_logits_fn(model: LoopedTransformer) -> LogitsFn:
    """Jitted ``(params, tokens_BL int32 [B, L], loops_C int32 [num_circuits]) -> logits [B, L, vocab]``,
    shared by every model of the same structure in this process (so its compiled programs are too)."""
    key = repr((dataclasses.asdict(model.cfg), model.vocab_size))
    if key not in _LOGITS_FNS:
        graphdef = nnx.graphdef(model)

        def logits(params: Any, tokens_BL: Array, loops_C: Array) -> Array:
            return nnx.merge(graphdef, params)(tokens_BL, loops=loops_C)[0]

        _LOGITS_FNS[key] = jax.jit(logits)
    return _LOGITS_FNS[key]


def loop_vector(model: LoopedTransformer, loops: Mapping[str, int] | None) -> Array:
    """int32 [num_circuits]: each circuit's eval_loops, overridden by ``loops``; LoopSpecError on a
    bad name or a count < 1."""
    for name, n in (loops or {}).items():
        if name not in model.circuit_names:
            raise LoopSpecError(f"unknown circuit '{name}'; this model's circuits are {', '.join(model.circuit_names)}")
        if int(n) < 1:
            raise LoopSpecError(f"loop count for circuit '{name}' must be >= 1, got {n}")
    return model.loop_vector(dict(loops or {}))


def generate_batch(logits_fn: LogitsFn, params: Any, prompts: Sequence[Sequence[int]], loops_C: Array,
                   max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Append ``max_new_tokens`` tokens to each prompt (all decoded together); returns the new tokens.

    temperature 0 is greedy (argmax); > 0 samples from softmax(logits / temperature) with a key
    derived from ``seed``. Each new token costs one full forward over [B, L] (no KV cache).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    lengths = np.array([len(p) for p in prompts])
    width = -(-(int(lengths.max()) + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
    buf = np.full((len(prompts), width), PAD, np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    rows = np.arange(len(prompts))
    key = jax.random.key(seed)
    for t in range(max_new_tokens):
        logits = logits_fn(params, jnp.asarray(buf), loops_C)  # [B, L, V]
        last_BV = logits[rows, lengths + t - 1]
        if temperature > 0:
            nxt = jax.random.categorical(jax.random.fold_in(key, t), last_BV / temperature, axis=-1)
        else:
            nxt = jnp.argmax(last_BV, axis=-1)
        buf[rows, lengths + t] = np.asarray(nxt)
    return [buf[i, lengths[i] : lengths[i] + max_new_tokens].tolist() for i in rows]


def generate_tokens(model: LoopedTransformer, params: Any, prompt_ids: Sequence[int],
                    loops: Mapping[str, int] | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                    seed: int = 0, logits_fn: LogitsFn | None = None) -> list[int]:
    """Continue ``prompt_ids`` by ``max_new_tokens`` tokens at the given loop counts (default: each
    circuit's eval_loops). Recomputes the full forward for every new token (no KV cache); pass
    ``logits_fn = make_logits_fn(model)`` to reuse its compiled program across calls."""
    fn = logits_fn or make_logits_fn(model)
    return generate_batch(fn, params, [list(prompt_ids)], loop_vector(model, loops), max_new_tokens,
                          temperature, seed)[0]


def generate_text(model: LoopedTransformer, params: Any, tokenizer: Tokenizer, prompt: str,
                  loops: Mapping[str, int] | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                  seed: int = 0, logits_fn: LogitsFn | None = None) -> str:
    """The decoded continuation of ``prompt``. Documents are trained as ``BOS ids EOS``: the prompt
    gets the tokenizer's ``bos_id`` in front when it has one, and the text stops at its ``eos_id``."""
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    ids = ([bos] if bos is not None else []) + list(tokenizer.encode(prompt))
    if not ids:
        raise LoopSpecError("--prompt encodes to no tokens; give a non-empty prompt")
    new = generate_tokens(model, params, ids, loops, max_new_tokens, temperature, seed, logits_fn)
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new)


# ----------------------------------------------------------------------------- synthetic tasks


def split_prompt(example: Mapping[str, np.ndarray]) -> tuple[list[int], int]:
    """The prompt tokens of one packed example (``inputs`` up to the first answer target) and its
    answer length: inputs[:a] predicts the first answer token at position a - 1."""
    mask = np.asarray(example["mask"]) > 0
    first = int(np.argmax(mask))
    return [int(t) for t in np.asarray(example["inputs"])[: first + 1]], int(mask.sum())


def answer_text(task: Task, inputs: np.ndarray, answer: Sequence[int]) -> str:
    """The answer part of ``task.render(inputs, answer)`` (the text replacing the '?' of the bare prompt)."""
    bare, full = task.render(inputs), task.render(inputs, list(answer))
    stem = bare[:-1] if bare.endswith("?") else bare
    return full[len(stem):] if full.startswith(stem) else full


def answer_examples(logits_fn: LogitsFn, params: Any, task: Task, examples: Mapping[str, np.ndarray],
                    settings: Sequence[tuple[dict[str, int], Array]]) -> list[dict[str, Any]]:
    """Autoregressive greedy answers to a batch of examples (``inputs``/``targets``/``mask`` [K, T]) at
    each loop setting ((loops by name, loop vector) pairs); a task with aligned labels is answered by
    one forward pass instead. One dict per example: prompt (rendered),
    true answer (tokens, text) and one prediction (loops, tokens, text, correct) per setting."""
    inputs = np.asarray(examples["inputs"])
    parts = [split_prompt({k: np.asarray(v)[i] for k, v in examples.items()}) for i in range(len(inputs))]
    prompts, lengths = [p for p, _ in parts], [n for _, n in parts]
    out = []
    for i in range(len(inputs)):
        truth = task.answer({k: np.asarray(v)[i] for k, v in examples.items()})
        out.append({"index": i, "prompt": task.render(inputs[i]),
                    "answer": {"tokens": truth, "text": answer_text(task, inputs[i], truth)}, "predictions": []})
    mask = np.asarray(examples["mask"]) > 0
    for loops, loop_v in settings:
        if task.labels_aligned:  # labels at input positions: one forward pass, argmax where mask
            pred_BT = np.asarray(jnp.argmax(logits_fn(params, jnp.asarray(inputs), loop_v), axis=-1))
            new = [pred_BT[i][mask[i]].tolist() for i in range(len(inputs))]
        else:
            new = generate_batch(logits_fn, params, prompts, loop_v, max(lengths))
        for i, ex in enumerate(out):
            pred = new[i][: lengths[i]]
            ex["predictions"].append({"loops": dict(loops), "tokens": pred, "text": answer_text(task, inputs[i], pred),
                                      "correct": pred == ex["answer"]["tokens"]})
    return out
