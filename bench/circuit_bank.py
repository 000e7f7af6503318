"""What batching same-shape circuits buys: a bank of C narrow circuits of one shape, with their weights
stored by name and stacked when the bank is called (one vmap), against the same bank run circuit by
circuit (``batch_circuits=False``). Train step and inference forward, alternated in rounds in one run.

    python bench/circuit_bank.py [--circuits 4] [--rounds 3] [--steps 10] [--json] [--out FILE]

JSON: {"rows": [{"variant": "batched" | "sequential", "train_ms": float, "infer_ms": float,
                 "train_tokens_per_s": float}], "train_speedup": float, "infer_speedup": float, ...}
(speedups: sequential time / batched time, best of the rounds).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from loopformer.config import TrainConfig, load_config  # noqa: E402
from loopformer.errors import LoopformerError  # noqa: E402
from loopformer.evaluation.evaluator import Evaluator  # noqa: E402
from loopformer.model.transformer import build_model  # noqa: E402
from loopformer.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from loopformer.train.step import StepSettings, init_state, make_train_step  # noqa: E402


def bank_config(size: dict[str, Any], circuits: int) -> Any:
    d, n = size["d_model"], size["loops"]
    w = d // circuits
    heads = max(1, min(size["heads"], w // 8))
    entries = ", ".join(f"{{name: C{i}, depth: 1, width: {w}, heads: {heads}, loops: 'fixed({n})', eval_loops: {n}, "
                        f"backprop: 4}}" for i in range(circuits))
    return load_config(None, [f"model.d_model={d}", f"model.heads={size['heads']}", "model.prelude=1", "model.coda=1",
                              f"model.compute_dtype={size['dtype']}", f"model.stages=[{{circuits: [{entries}]}}]"]).model


def variant(cfg: Any, size: dict[str, Any], batched: bool) -> dict[str, Any]:
    model = build_model(cfg, size["vocab"], 0, batch_circuits=batched)
    graphdef, params = nnx.split(model)
    tcfg = TrainConfig(steps=10**6, warmup_steps=10)
    tx = make_optimizer(tcfg)
    step = make_train_step(graphdef, tx, StepSettings(cfg, learning_rate_schedule(tcfg)))
    evaluator = Evaluator(graphdef, model.circuit_names, cfg.d_model)
    return {"step": step, "state": init_state(nnx.to_pure_dict(params), tx), "evaluator": evaluator,
            "loops": {c.name: c.eval_loops for c in cfg.circuits()}, "train": [], "infer": [],
            "groups": [len(g) for g in model.stages[0].groups(evaluator.plan({c: 1 for c in model.circuit_names}))]}


def main() -> None:
    p = C.parser(C.about(__doc__))
    p.add_argument("--circuits", type=int, default=4, help="circuits in the bank (d_model / C wide each)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (best round reported)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per round")
    args = p.parse_args()
    C.at_least(p, args, {"--circuits": 1, "--rounds": 1, "--steps": 1})  # 0 rounds or steps: an empty min() / 0 division
    C.at_most(p, args, {"--rounds": C.REPS, "--steps": C.TIMED_STEPS})
    size = dict(C.SIZES[args.size])
    # each circuit is d_model / C wide: 11 digits built a config of 1e11 entries before the library could refuse it
    # (a hang, #27 pass 22)
    C.at_most(p, args, {"--circuits": (size["d_model"] // 2, f"each circuit is d_model {size['d_model']} / C wide, "
                                                              f"at least 2")})
    try:
        cfg = bank_config(size, args.circuits)
    except LoopformerError as e:  # circuits that do not split d_model into widths the heads divide
        p.error(f"--circuits {args.circuits}: {e} (d_model {size['d_model']}: try 2 or 4)")
    batch = C.synthetic_batch(size)
    runs = {"batched": variant(cfg, size, True), "sequential": variant(cfg, size, False)}
    for name, v in runs.items():  # compile
        t0 = time.perf_counter()
        v["state"], m = v["step"](v["state"], batch)
        C.block(m)
        v["evaluator"].evaluate(v["state"]["params"], [batch], v["loops"])
        C.log(f"{name}: groups {v['groups']}, compile {time.perf_counter() - t0:.1f}s", args)
    for _ in range(args.rounds):
        for v in runs.values():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                v["state"], m = v["step"](v["state"], batch)
            C.block(m)
            v["train"].append((time.perf_counter() - t0) / args.steps)
            v["infer"].append(C.timed(lambda v=v: v["evaluator"].evaluate(v["state"]["params"], [batch], v["loops"])))
    tokens = size["batch"] * size["seq"]
    rows = [{"variant": n, "groups": v["groups"], "train_ms": 1e3 * min(v["train"]), "infer_ms": 1e3 * min(v["infer"]),
             "train_tokens_per_s": tokens / min(v["train"])} for n, v in runs.items()]
    result = {"bench": "circuit_bank", "size": args.size, "preset": size, "circuits": args.circuits,
              "env": C.environment(), "rows": rows,
              "train_speedup": min(runs["sequential"]["train"]) / min(runs["batched"]["train"]),
              "infer_speedup": min(runs["sequential"]["infer"]) / min(runs["batched"]["infer"]),
              "all_rounds": {n: {"train_s": v["train"], "infer_s": v["infer"]} for n, v in runs.items()}}
    table = C.table(f"bank of {args.circuits} circuits of width {size['d_model'] // args.circuits}, {size['loops']} loops "
                    f"(batch {size['batch']} x seq {size['seq']}); best of {args.rounds} rounds; batched/sequential: "
                    f"train x{result['train_speedup']:.2f}, inference x{result['infer_speedup']:.2f}",
                    ["variant", "vmap groups", "train step ms", "train tok/s", "inference ms"],
                    [[r["variant"], ",".join(map(str, r["groups"])), r["train_ms"], r["train_tokens_per_s"],
                      r["infer_ms"]] for r in rows])
    C.emit(result, [table], args)


if __name__ == "__main__":
    C.run_main(main)
