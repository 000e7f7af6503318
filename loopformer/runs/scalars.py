"""A run's logged metrics: `<run_dir>/metrics.jsonl` and tensorboard event files under `<run_dir>/tb/`
(written by the trainer and by ``loopformer sweep``, read back by the tests and the tools).

Event files are written with tensorboard's own `EventFileWriter` (tensorflow is not needed).
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer import event_file_writer
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from loopformer import jsontext
from loopformer.errors import CheckpointError
from loopformer.runs.layout import RunDir

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class MetricsWriter:
    """Writes scalars to <run_dir>/metrics.jsonl (one JSON object per line: {"step": int, "<name>": float,
    ...}) and tensorboard event files under <run_dir>/tb/.

    Resuming a run appends to metrics.jsonl and starts a new event file; with ``resume_step`` (the step
    training restarts from) the lines of later steps, logged before a crash and about to be trained
    again, are dropped first, and the event file starts with a session start at the next step (tensorboard then
    drops the earlier files' points of later steps), so no step appears twice. With `enabled=False` (non-main
    processes) every call is a no-op and nothing is written.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl: Any = None
        self._tb: EventFileWriter | None = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_metrics(self.run_dir, resume_step)
            self._jsonl = open(RunDir(self.run_dir).metrics, "a", encoding="utf-8")  # noqa: SIM115
            self._tb = EventFileWriter(str(RunDir(self.run_dir).tb), flush_secs=30)
            _quiet_writer_thread()
            if resume_step is not None:
                # tensorboard drops the points of later steps that an earlier process logged (a crash after its last
                # checkpoint: a trajectory that was lost and is trained again) only at a session start: without it
                # those steps showed two values, and the lost run's points between the logged ones stayed
                start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=resume_step + 1, session_log=start))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Logs `values` (names like "train/loss", "eval/2x/accuracy") at `step`."""
        if self._tb is None:
            return
        step = int(step)
        floats = {name: float(value) for name, value in values.items()}
        self._jsonl.write(json.dumps({"step": step, **floats}) + "\n")
        self._jsonl.flush()
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=name, simple_value=v) for name, v in floats.items()]
        )
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def image(self, step: int, tag: str, png_bytes: bytes) -> None:
        """Logs a PNG (e.g. a matplotlib plot) to tensorboard."""
        if self._tb is None:
            return
        if png_bytes[:8] != _PNG_SIGNATURE:
            raise ValueError(f"image {tag!r}: expected PNG bytes")
        width, height = struct.unpack(">II", png_bytes[16:24])  # the IHDR chunk always comes first
        image = summary_pb2.Summary.Image(height=height, width=width, encoded_image_string=png_bytes)
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)])
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def histogram(self, step: int, tag: str, counts: Mapping[int, int]) -> None:
        """Logs a histogram of integer values (e.g. the iteration each token exited at: {value: count})
        to tensorboard, one bucket per value."""
        if self._tb is None or not counts:
            return
        values = sorted(counts)
        total = sum(counts.values())
        proto = summary_pb2.HistogramProto(
            min=float(values[0]), max=float(values[-1]), num=float(total),
            sum=float(sum(v * c for v, c in counts.items())), sum_squares=float(sum(v * v * c for v, c in counts.items())),
            bucket_limit=[v + 0.5 for v in values], bucket=[float(counts[v]) for v in values])
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, histo=proto)])
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        """Writes everything buffered so far to disk."""
        if self._tb is not None:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files; later calls are no-ops."""
        if self._tb is not None:
            jsonl, tb = self._jsonl, self._tb
            self._jsonl = self._tb = None
            try:
                tb.flush()  # raises what the writer's thread met (a disk that filled): `close` alone drops it
            finally:
                jsonl.close()
                tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_writer_thread() -> None:
    """No "Exception in thread" traceback from tensorboard's writer thread (a disk that filled between two of its
    flushes): the writer keeps the exception and raises it in the caller at the next `scalars`, `flush` or
    `close`, where the trainer reports it as one line. Exceptions of every other thread print as before."""
    if getattr(threading.excepthook, "quiet_writer_thread", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.thread, getattr(event_file_writer, "_AsyncWriterThread", ())):
            previous(args)

    hook.quiet_writer_thread = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _records(path: Path) -> tuple[str, list[tuple[str, dict | None]]]:
    """The text of ``metrics.jsonl`` and its non-blank lines, each with its record (None: a torn last line, which
    only a crash leaves). CheckpointError naming the file and line for anything else that is not a record (a file
    edited or damaged by hand): the trainer would fail on it, or drop what it cannot read."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (bad byte at offset {e.start}), so its records cannot be read; "
                              f"restore the file, or move it aside (the run's checkpoints do not need it)") from None
    lines = [line for line in text.splitlines() if line.strip()]
    parsed: list[tuple[str, dict | None]] = []
    for i, line in enumerate(lines):
        try:
            record = jsontext.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            parsed.append((line, record))
        elif record is None and i == len(lines) - 1:  # only the last line can be cut short by a crash
            parsed.append((line, None))
        else:
            number = text.splitlines().index(line) + 1
            raise CheckpointError(f"{path}:{number}: not a record of the run's metrics (a JSON object with its "
                                  f"\"step\"), so the file was edited or damaged; fix or delete that line, or move "
                                  f"the file aside (the run's checkpoints do not need it)")
    return text, parsed


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Parses <run_dir>/metrics.jsonl (an empty list if absent; a torn last line is skipped); CheckpointError
    naming a line that is not a record."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    return [record for _, record in _records(path)[1] if record is not None]


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` after ``step`` (and a torn last line), rewriting the file
    atomically; returns how many were dropped (0: the file is left untouched)."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return 0
    text, lines = _records(path)
    keep = [line for line, record in lines if record is not None and record["step"] <= step]
    if len(keep) == len(lines) and (not lines or text.endswith("\n")):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)
    return len(lines) - len(keep)


def read_tensorboard_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Reads every scalar under <run_dir>/tb/ back as {tag: [(step, value), ...]}.

    Values are float32 (tensorboard's storage type); like tensorboard itself, points orphaned by a
    resume from an earlier step are dropped.
    """
    from tensorboard.backend.event_processing import event_accumulator

    tb_dir = RunDir(run_dir).tb
    if not tb_dir.is_dir():
        return {}
    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
