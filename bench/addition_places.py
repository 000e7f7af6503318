"""Where addition fails: the accuracy of each answer digit (teacher forced) of trained think_longer addition
models, at the digit counts given. An exact-match score of 0 % can hide a model that writes every digit but one;
this table says which place goes wrong.

    python bench/addition_places.py --setting addition_coupled --runs DIR [--models looped,equal_params]
        [--seeds 1] [--digits 8,12,16,32] [--examples 256] [--json] [--out FILE]

DIR is the --out of `bench/think_longer.py` that trained the models. Each (seed, model, digits) is scored on a set
of its own ("places/D", drawn from the seed; D is the setting's difficulty, the digit count except in
addition_chain, a carry chain, and the runs settings, a run's length), at the model's sweep unit (looped: the
setting's training mean and twice it; baselines: 1). Prints a table and with --json one document
{"setting", "rows": [{"seed", "model", "digits", "loops", "exact", "places": [accuracy of each answer place]}]}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import think_longer as tl  # noqa: E402

from loopformer.data.pipeline import eval_batches  # noqa: E402
from loopformer.data.sources import build_data  # noqa: E402
from loopformer.data.tasks import make_task  # noqa: E402
from loopformer.errors import LoopformerError  # noqa: E402
from loopformer.evaluation.evaluator import evaluator_for  # noqa: E402
from loopformer.evaluation.tables import format_table  # noqa: E402
from loopformer.model.attend import scores_bytes  # noqa: E402
from loopformer.runs.restore import restore_params  # noqa: E402


def place_accuracy(pred_BT: np.ndarray, batch: dict) -> tuple[float, list[float]]:
    """(exact match, accuracy of each answer position in order) over the real rows of one batch whose answers
    all have the same length (one digit count)."""
    mask = batch["mask"] > 0
    real = mask.any(1)
    mask, pred, targets = mask[real], pred_BT[real], batch["targets"][real]
    exact = float(np.all((pred == targets) | ~mask, axis=1).mean())
    pos = np.stack([np.flatnonzero(r) for r in mask])  # [B, answer length]
    rows = np.arange(len(pos))[:, None]
    return exact, (pred[rows, pos] == targets[rows, pos]).mean(0).tolist()


def run(setting: str, runs: Path, models: list[str], seeds: int, digits: list[int], examples: int) -> list[dict]:
    out = []
    for seed in range(seeds):
        for model_name in models:
            cfg = tl.config(setting, model_name, tl.TASKS[setting].steps[1], runs, examples, seed)
            if not (cfg.run_dir / "checkpoints").is_dir():
                raise LoopformerError(f"--runs {runs}: no trained {model_name} of seed {seed} at {cfg.run_dir}; run "
                                      f"bench/think_longer.py --tasks {setting} --out {runs} first")
            data = build_data(cfg)
            model, params, _ = restore_params(cfg, data=data)
            evaluator = evaluator_for(model)
            m = tl.TASKS[setting].train_loops
            for d in digits:
                batches = eval_batches(data.task, f"places/{d}", (d, d), examples, examples, cfg.seed)
                for n in ([m, 2 * m] if tl.is_looped(model_name) else [1]):
                    pred = np.asarray(evaluator.logits(params, batches[0]["inputs"], {"X": n})).argmax(-1)
                    exact, places = place_accuracy(pred, batches[0])
                    out.append({"seed": seed, "model": model_name, "digits": d, "loops": n, "exact": exact,
                                "places": places})
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--setting", default="addition_coupled")
    p.add_argument("--runs", type=C.folder, required=True)
    p.add_argument("--models", default="looped,equal_params")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--digits", default="8,12,16,32")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=C.out_file)
    args = p.parse_args(argv)
    if args.setting not in tl.TASKS or tl.task_of(args.setting) != "addition":
        p.error(f"--setting {args.setting!r}: choose an addition setting of bench/think_longer.py "
                f"({', '.join(n for n in tl.TASKS if tl.task_of(n) == 'addition')})")
    models = args.models.split(",")
    if any(m not in tl.models(tl.TASKS[args.setting], ablate=True) for m in models):
        p.error(f"--models {args.models}: choose from {', '.join(tl.models(tl.TASKS[args.setting], ablate=True))}")
    if len(set(models)) < len(models):  # it was scored and reported twice
        p.error(f"--models {args.models}: a model is given twice; give each once")
    digits = C.int_list(p, "--digits", args.digits)
    C.at_least(p, args, {"--seeds": 1, "--examples": 1})
    C.at_most(p, args, {"--examples": C.EXAMPLES})
    # every set of --examples is one batch: attention over a huge digit count ran out of memory in XLA
    task = make_task("addition", **tl.TASKS[args.setting].task_args)
    heads = tl.config(args.setting, models[0], 1, args.runs, 1).model.max_heads
    C.fits_memory(p, "--digits", max(digits), lambda d: scores_bytes(args.examples, task.seq_len(d), heads),
                  f"attention over {args.examples:,} examples of {task.seq_len(max(digits)):,} tokens", "lower --examples")
    rows = run(args.setting, args.runs, models, args.seeds, digits, args.examples)
    # the answer's places: D + 1 of D-digit operands, but more where the difficulty is not the digit count
    # (addition_chain's carry chain, the runs settings' run length; a header of D + 1 columns was a traceback)
    width = max(len(r["places"]) for r in rows)
    print(format_table(["seed", "model", "digits", "loops", "exact %"] + [f"p{i}" for i in range(1, width + 1)],
                       [[r["seed"], r["model"], r["digits"], r["loops"], f"{100 * r['exact']:.1f}",
                         *(f"{100 * a:.0f}" for a in r["places"]), *([""] * (width - len(r["places"])))]
                        for r in rows]), file=sys.stderr if args.json else sys.stdout)
    doc = {"setting": args.setting, "rows": rows, "environment": C.environment()}
    if args.out:
        C.write_out(args.out, C.dumps(doc, indent=1), "in the table above")
    if args.json:
        print(C.dumps(doc))
    return 0


if __name__ == "__main__":
    C.run_main(main)  # no trained runs under --runs, a bad override: one line, no traceback
