"""Probe sets: small files of prompts and answers that score a text model (the layer-duplication
experiments scored each setting on such sets: math estimates, emotional reasoning).

A probe file is JSON Lines, one ``{"prompt": str, "answer": str}`` per line (``asset:NAME`` names a shipped
one). Each probe becomes one example, ``prompt ids + answer ids`` packed as next-token data with the mask on
the answer's tokens (the answer is encoded on its own and appended, so a prompt ending in a space and an
answer "42" give the tokens of " " then of "42"). The evaluator's loss over a probe set is then the mean
negative log-likelihood per answer token, and its exact match the share of answers that greedy decoding
reproduces token for token (every answer token is the argmax given the prompt and the answer so far).

    arithmetic_probes(n, seed)  the shipped set's generator (``asset:probes_arithmetic.jsonl``)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from loopformer.data.tasks import pack_answer
from loopformer.data.text import ASSET_PREFIX, RepeatedKey, asset_path, json_line
from loopformer.errors import DataError
from loopformer.runs.layout import not_a_file

Probe = tuple[str, str]
ARITHMETIC = "probes_arithmetic.jsonl"


def read_probes(path: str | Path) -> list[Probe]:
    """The (prompt, answer) pairs of a probe file; DataError naming the file and line of a bad one."""
    text_path = str(path)
    try:
        p = asset_path(text_path[len(ASSET_PREFIX):]) if text_path.startswith(ASSET_PREFIX) else Path(path).expanduser()
    except DataError:
        p = Path(text_path)  # not a shipped asset: the line below says so
    what = not_a_file(p)
    if what:
        raise DataError(f"--probe {path} {what} (a JSONL file of {{\"prompt\": ..., \"answer\": ...}} lines, "
                        f"or asset:{ARITHMETIC})")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a leading BOM (Notepad) was "not a JSON object"
    except UnicodeDecodeError as e:
        raise DataError(f"--probe {path}: not UTF-8 text (bad byte at offset {e.start})") from None
    probes = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json_line(line)
        except RepeatedKey as e:
            raise DataError(f"{p}:{i}: key '{e}' is given twice; keep one") from None
        except json.JSONDecodeError:
            raise DataError(f"{p}:{i}: not a JSON object") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)
                and row["answer"]):
            raise DataError(f"{p}:{i}: a probe is {{\"prompt\": TEXT, \"answer\": TEXT}} with a non-empty answer")
        probes.append((row["prompt"], row["answer"]))
    if not probes:
        raise DataError(f"--probe {path}: the file holds no probes")
    return probes


def probe_batches(probes: Sequence[Probe], encode_prompt: Callable[[str], list[int]],
                  encode: Callable[[str], list[int]], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Next-token batches of the probes: ``inputs``/``targets`` int32 [b, T], ``mask`` 1 on the answer's
    targets, ``segment_ids`` 1 on real tokens (T: the longest probe, rounded up to a multiple of 16 so that a
    few programs serve every set). DataError for an answer that encodes to no tokens."""
    seqs = []
    for prompt, answer in probes:
        p, a = list(encode_prompt(prompt)), list(encode(answer))
        if not a:
            raise DataError(f"probe answer {answer!r} encodes to no tokens")
        seqs.append((p + a, len(p)))
    T = -(-max(len(s) - 1 for s, _ in seqs) // 16) * 16
    rows = [pack_answer(seq, start, T) for seq, start in seqs]  # mask: the targets that are answer tokens
    while len(rows) % batch_size:  # a full last batch (one program): padding rows have no answer
        rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
    return [{k: np.stack([r[k] for r in rows[i : i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]


def arithmetic_probes(n: int = 64, seed: int = 0) -> list[Probe]:
    """``n`` questions "What is A + B? Answer: " / "A - B" / "A * B" with two-digit operands (products of a
    two-digit and a one-digit number) and their answers in digits."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        op = "+-*"[int(rng.integers(3))]
        a = int(rng.integers(10, 100))
        b = int(rng.integers(2, 10)) if op == "*" else int(rng.integers(10, 100))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append((f"What is {a} {op} {b}? Answer: ", str(value)))
    return out


def write_probes(probes: Sequence[Probe], path: Path) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in probes), encoding="utf-8")
