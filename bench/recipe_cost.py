"""What a training recipe costs per step: a config's train step with and without some overrides, timed
in one process, alternating blocks of steps so both see the same machine load.

Both steps are compiled first (not timed), then ``--rounds`` times: ``--steps`` steps of the base config,
then as many of the changed one, each on its config's batches (the same ones unless the overrides change the
data). Reports the median milliseconds per step of each and their ratio (changed / base).

    python bench/recipe_cost.py --config configs/quickstart.yaml [--steps 20] [--rounds 5] [--json] key=value ...

JSON: {"config": str, "overrides": [str], "env": {...} (versions, device, CPUs), "steps": int, "rounds": int,
       "base_ms": float, "changed_ms": float, "ratio": float, "base_rounds_ms": [float], "changed_rounds_ms": [float]}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from loopformer.config import load_config  # noqa: E402
from loopformer.config.load import repeated_override  # noqa: E402
from loopformer.data.sources import build_data  # noqa: E402
from loopformer.runs.restore import make_model  # noqa: E402
from loopformer.train.optim import make_optimizer  # noqa: E402
from loopformer.train.step import StepSettings, init_state, make_train_step  # noqa: E402


def _stepper(config: str, overrides: list[str]):
    """(the jitted train step, its initial state, the config's batches) for ``config`` with ``overrides``."""
    cfg = load_config(config, overrides, once=True)
    data = build_data(cfg)
    graphdef, params = nnx.split(make_model(cfg, data))
    tx = make_optimizer(cfg.train)
    state = init_state(nnx.to_pure_dict(params), tx, ema=bool(cfg.train.ema))
    return make_train_step(graphdef, tx, StepSettings.of(cfg)), state, data.train_iterator(cfg.data.batch_size, 0)


def time_steps(step, state, batches: list, n: int) -> tuple[object, float]:
    """(the state after ``n`` steps, milliseconds per step)."""
    t0 = time.perf_counter()
    for i in range(n):
        state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics["loss"])
    return state, 1000 * (time.perf_counter() - t0) / n


def measure(config: str, overrides: list[str], steps: int, rounds: int) -> dict:
    (base, s_base, it), (changed, s_changed, it_changed) = _stepper(config, []), _stepper(config, overrides)
    batches = [next(it) for _ in range(steps)]
    # the changed config's own batches (the same ones unless the overrides change the data): on the base batches a
    # data setting (data.batch_size=128, a train_difficulty) was timed as no change at all (#27 pass 22)
    changed_batches = [next(it_changed) for _ in range(steps)]
    s_base, _ = time_steps(base, s_base, batches, 1)  # compile
    s_changed, _ = time_steps(changed, s_changed, changed_batches, 1)
    base_ms, changed_ms = [], []
    for _ in range(rounds):
        s_base, ms = time_steps(base, s_base, batches, steps)
        base_ms.append(ms)
        s_changed, ms = time_steps(changed, s_changed, changed_batches, steps)
        changed_ms.append(ms)
    b, c = float(np.median(base_ms)), float(np.median(changed_ms))
    return {"config": config, "overrides": overrides, "env": C.environment(), "steps": steps, "rounds": rounds,
            "base_ms": b, "changed_ms": c, "ratio": c / b, "base_rounds_ms": base_ms, "changed_rounds_ms": changed_ms}


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks of each (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("overrides", nargs="+", metavar="key=value", help="the change whose cost is measured")
    args = p.parse_args()
    C.at_least(p, args, {"--steps": 1, "--rounds": 1})
    C.at_most(p, args, {"--steps": C.TIMED_STEPS, "--rounds": C.REPS})
    twice = repeated_override(args.overrides)
    if twice:  # the last one would win with no word
        p.error(twice)
    doc = measure(args.config, args.overrides, args.steps, args.rounds)
    print(C.dumps(doc) if args.json else
          f"{args.config}: base {doc['base_ms']:.1f} ms/step, with {' '.join(args.overrides)} "
          f"{doc['changed_ms']:.1f} ms/step: {doc['ratio']:.2f}x (median of {args.rounds} blocks of {args.steps} steps)")
    return 0


if __name__ == "__main__":
    C.run_main(main)
