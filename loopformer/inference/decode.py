"""Fast decoding: prefill the prompts into a key/value cache, then generate token by token inside one
compiled loop (`lax.while_loop`), with greedy, temperature, top-k and top-p sampling and a stop token.

One program serves every batch of ``B`` prompts padded to ``P`` positions with up to ``N`` new tokens
(both rounded up to buckets), whatever the loop counts, sampling settings or exit thresholds: those are
runtime inputs. The cache policy (`loopformer.model.cache.CachePolicy`) decides which loop iteration's
keys and values later tokens read; ``full`` is exact (the same logits as recomputing the whole prefix).

    gen = decoder_for(model, "full")             # model: a LoopedTransformer (shapes suffice)
    out = gen(params, prompts, loops={"X": 8}, max_new_tokens=64, sampling=Sampling(temperature=0.8))
    out.tokens, out.lengths, out.loops            # [B, N] new tokens, [B] how many before the stop, per circuit

With exits, ``compact=True`` (`Plan.compact`; None: chunks of COMPACT_MIN_TOKENS tokens or more, False:
masked) runs a one-block circuit's iterations on the tokens still running only, gathered into a dense
buffer of a few static sizes; the logits are the masked ones. ``out.computed`` counts the token-iterations
each circuit's blocks executed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.errors import PlanError
from loopformer.model.plan import Plan, make_plan
from loopformer.model.transformer import LoopedTransformer
from loopformer.variants.cache import CachePolicy

Array = jax.Array
PROMPT_BUCKET = 32
NEW_BUCKET = 32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["temperature", "top_k", "top_p"], meta_fields=[])
@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1 = off (all traced: no recompiles)."""

    temperature: float | Array = 0.0
    top_k: int | Array = 0
    top_p: float | Array = 1.0


def sample(logits_BV: Array, key: Array, s: Sampling) -> Array:
    """int32 [B]: the next token under ``s``."""
    logits = logits_BV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(s.temperature, 1e-6)
    V = logits.shape[-1]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.clip(jnp.where(s.top_k > 0, s.top_k, V), 1, V)
    kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    probs = jax.nn.softmax(ranked, axis=-1)
    cut = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < s.top_p, axis=-1, keepdims=True)  # smallest set >= top_p
    floor = jnp.take_along_axis(ranked, jnp.maximum(cut - 1, 0), axis=-1)
    scaled = jnp.where(scaled < floor, -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(s.temperature > 0, drawn, greedy).astype(jnp.int32)


@dataclass
class Generated:
    tokens: np.ndarray  # [B, max_new_tokens] (after a row's stop token: the stop token again)
    lengths: np.ndarray  # [B] new tokens up to and including the stop token (max_new_tokens if none)
    loops: dict[str, np.ndarray]  # {circuit: [B, max_new_tokens]} iterations each new token ran
    # {circuit: token-iterations its blocks executed, prefill and every step (rows already stopped included)}
    computed: dict[str, float] = field(default_factory=dict)


def _bucket(n: int, size: int) -> int:
    return -(-max(n, 1) // size) * size


class Decoder:
    """Compiled prefill + decode for one model structure and cache policy; call it with params."""

    def __init__(self, graphdef: nnx.GraphDef, circuits: Sequence[str], policy: CachePolicy | str = "full", *,
                 continuous: bool = False):
        self.graphdef = graphdef
        self.names = list(circuits)
        self.policy = CachePolicy.parse(policy) if isinstance(policy, str) else policy
        self.continuous = continuous
        self.compiles = 0
        self._run = jax.jit(self._generate, static_argnums=(5, 6, 7))

    def _generate(self, params: Any, prompts_BP: Array, lengths_B: Array, plan: Plan, sampling: Sampling,
                  new: int, slots: tuple[tuple[str, int], ...], stops: tuple[int, ...], key: Array) -> tuple:
        self.compiles += 1  # trace time only
        model = nnx.merge(self.graphdef, params)
        B, P = prompts_BP.shape
        cache = model.empty_cache(B, P + new, self.policy, dict(slots))
        positions = jnp.broadcast_to(jnp.arange(P), (B, P))
        logits, cache, used, computed0 = model.decode(prompts_BP, positions, cache, plan, self.policy,
                                                      last_B=lengths_B - 1)
        first = sample(logits[jnp.arange(B), lengths_B - 1], jax.random.fold_in(key, 0), sampling)
        out0 = jnp.zeros((B, new), jnp.int32).at[:, 0].set(first)
        # loops[n][:, j]: the iterations that produced new token j (token 0: the prompt's last position)
        loops0 = {n: jnp.zeros((B, new), jnp.float32).at[:, 0].set(used[n][jnp.arange(B), lengths_B - 1])
                  for n in self.names}
        stop_ids = jnp.asarray(stops, jnp.int32)
        done0 = jnp.isin(first, stop_ids)
        count0 = jnp.ones((B,), jnp.int32)

        def cond(c: tuple) -> Array:
            return (c[0] < new) & ~jnp.all(c[4])

        def body(c: tuple) -> tuple:
            step, cache, out, loops, done, count, computed = c
            token = out[:, step - 1]
            pos = (lengths_B + step - 1)[:, None]
            logits, cache, used, ran = model.decode(token[:, None], pos, cache, plan, self.policy,
                                                    continuous=self.continuous)
            computed = {n: computed[n] + ran[n] for n in self.names}
            nxt = sample(logits[:, 0], jax.random.fold_in(key, step), sampling)
            nxt = jnp.where(done, token, nxt)  # a finished row repeats its stop token
            out = out.at[:, step].set(nxt)
            loops = {n: loops[n].at[:, step].set(jnp.where(done, 0.0, used[n][:, 0])) for n in self.names}
            count = count + (~done).astype(jnp.int32)
            done = done | jnp.isin(nxt, stop_ids)
            return step + 1, cache, out, loops, done, count, computed

        _, _, out, loops, _, count, computed = jax.lax.while_loop(
            cond, body, (jnp.ones((), jnp.int32), cache, out0, loops0, done0, count0, computed0))
        return out, count, loops, computed

    def _score(self, params: Any, prompts_BP: Array, lengths_B: Array, follow_BN: Array, plan: Plan,
               slots: tuple[tuple[str, int], ...]) -> Array:
        self.compiles += 1
        model = nnx.merge(self.graphdef, params)
        (B, P), N = prompts_BP.shape, follow_BN.shape[1]
        cache = model.empty_cache(B, P + N, self.policy, dict(slots))
        positions = jnp.broadcast_to(jnp.arange(P), (B, P))
        logits, cache = model.decode(prompts_BP, positions, cache, plan, self.policy, last_B=lengths_B - 1)[:2]

        def step(cache: Any, j: Array) -> tuple[Any, Array]:
            out, cache = model.decode(follow_BN[:, j][:, None], (lengths_B + j)[:, None], cache, plan, self.policy,
                                         continuous=self.continuous)[:2]
            return cache, out[:, 0]

        _, rest = jax.lax.scan(step, cache, jnp.arange(N - 1))
        return jnp.concatenate([logits[jnp.arange(B), lengths_B - 1][:, None], jnp.moveaxis(rest, 0, 1)], axis=1)

    def score(self, params: Any, prompts: Sequence[Sequence[int]], continuations: np.ndarray, loops: Mapping[str, int],
              *, exits: Mapping[str, Any] | None = None, compact: bool | None = None) -> np.ndarray:
        """Teacher-forced cached decoding: logits [B, N, V] predicting each token of ``continuations``
        [B, N] after its prompt (position j: given the prompt and continuation[:j]); ``exits`` and
        ``compact`` as in `__call__`."""
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        P = _bucket(int(lengths.max()), PROMPT_BUCKET)
        buf = np.zeros((len(prompts), P), np.int32)
        for i, p in enumerate(prompts):
            buf[i, : len(p)] = p
        slots = tuple((n, self.policy.slots(int(loops[n]))) for n in self.names)
        fn = jax.jit(self._score, static_argnums=(5,))
        plan = make_plan(self.names, loops, exits=exits, compact=compact)
        nnx.merge(self.graphdef, params).check_decoding(plan)
        return np.asarray(fn(params, jnp.asarray(buf), jnp.asarray(lengths), jnp.asarray(continuations, jnp.int32),
                             plan, slots))

    def __call__(self, params: Any, prompts: Sequence[Sequence[int]], loops: Mapping[str, int], max_new_tokens: int,
                 sampling: Sampling | None = None, *, eos_id: int | Sequence[int] | None = None,
                 exits: Mapping[str, Any] | None = None, compact: bool | None = None,
                 seed: int = 0) -> Generated:
        """Continue each prompt by ``max_new_tokens`` tokens with every circuit at ``loops`` (the caps when
        ``exits`` are given), stopping a row at ``eos_id`` (one id or several: any of them). ``compact``
        (`Plan.compact`): with exits, run a one-block circuit's iterations on the running tokens only (True),
        every token (False), or by the size of the chunk (None: prefill and steps of COMPACT_MIN_TOKENS tokens
        or more); the same tokens and logits either way."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise PlanError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise PlanError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        P, N = _bucket(int(lengths.max()), PROMPT_BUCKET), _bucket(max_new_tokens, NEW_BUCKET)
        buf = np.zeros((len(prompts), P), np.int32)
        for i, p in enumerate(prompts):
            buf[i, : len(p)] = p
        plan = make_plan(self.names, loops, exits=exits, compact=compact)
        nnx.merge(self.graphdef, params).check_decoding(plan)  # refusals before tracing: one clear line
        slots = tuple((n, self.policy.slots(int(loops[n]))) for n in self.names)  # static: one program per bucket
        out, count, used, computed = self._run(params, jnp.asarray(buf), jnp.asarray(lengths), plan,
                                               sampling or Sampling(), N, slots, stop_tuple(eos_id), jax.random.key(seed))
        out, count = np.asarray(out)[:, :max_new_tokens], np.minimum(np.asarray(count), max_new_tokens)
        return Generated(out, count, {n: np.asarray(v)[:, :max_new_tokens] for n, v in used.items()},
                         {n: float(v) for n, v in computed.items()})


def stop_tuple(ids: int | Sequence[int] | None) -> tuple[int, ...]:
    """Stop ids as the static tuple the decoding program is compiled for (None: none)."""
    if ids is None:
        return ()
    return (int(ids),) if isinstance(ids, int | np.integer) else tuple(int(i) for i in ids)


@functools.lru_cache(maxsize=8)
def _decoder(graphdef: nnx.GraphDef, names: tuple[str, ...], policy: CachePolicy, continuous: bool) -> Decoder:
    return Decoder(graphdef, names, policy, continuous=continuous)


def decoder_for(model: LoopedTransformer, policy: CachePolicy | str = "full", continuous: bool = False) -> Decoder:
    """The process's Decoder for this model structure and policy (commands run one after another share its
    compiled programs)."""
    policy = CachePolicy.parse(policy) if isinstance(policy, str) else policy
    return _decoder(nnx.graphdef(model), tuple(model.circuit_names), policy, continuous)
