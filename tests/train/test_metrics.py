"""Tests for loopformer.runs.scalars and loopformer.train.progress."""

import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from loopformer.runs.scalars import MetricsWriter, read_metrics, read_tensorboard_scalars
from loopformer.train.progress import ProgressLine


def tiny_png() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 0.5), dpi=40)
    ax.plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def test_jsonl_and_tensorboard_round_trip(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.scalars(1, {"train/loss": np.float32(2.5), "train/accuracy": jnp.asarray(0.25)})
        writer.scalars(2, {"train/loss": 1.75})
        writer.scalars(2, {"eval/2x/accuracy": 0.5})
    records = read_metrics(tmp_path)
    assert records == [
        {"step": 1, "train/loss": 2.5, "train/accuracy": 0.25},
        {"step": 2, "train/loss": 1.75},
        {"step": 2, "eval/2x/accuracy": 0.5},
    ]
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(type(v) in (int, float) for line in raw for v in json.loads(line).values())
    assert read_tensorboard_scalars(tmp_path) == {
        "train/loss": [(1, 2.5), (2, 1.75)],
        "train/accuracy": [(1, 0.25)],
        "eval/2x/accuracy": [(2, 0.5)],
    }


def test_resume_appends(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.scalars(1, {"loss": 3.0})
    with MetricsWriter(tmp_path) as writer:
        writer.scalars(2, {"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_tensorboard_scalars(tmp_path) == {"loss": [(1, 3.0), (2, 2.0)]}


def test_a_resume_drops_the_lost_steps_from_tensorboard_too(tmp_path):
    """#27 pass 23: a trainer killed after its last checkpoint (step 2) had logged steps 3-5; the resume trains them
    again. metrics.jsonl dropped them, but tensorboard (event files "brain.Event:2") drops a file's later points only
    at a session start: steps 4 showed two values, and the lost run's 3 and 5 stayed between the new ones."""
    import time

    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.scalars(step, {"train/loss": float(step)})
    time.sleep(1.1)  # a new event file (its name has the second it was made)
    with MetricsWriter(tmp_path, resume_step=2) as writer:
        writer.scalars(4, {"train/loss": 40.0})
        writer.scalars(6, {"train/loss": 60.0})
    points = [(step, v) for step, v in read_tensorboard_scalars(tmp_path)["train/loss"]]
    assert points == [(1, 1.0), (2, 2.0), (4, 40.0), (6, 60.0)]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == points


def test_tensorboard_values_are_float32(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.scalars(0, {"lr": 1e-3})
    [(step, value)] = read_tensorboard_scalars(tmp_path)["lr"]
    assert step == 0 and value == pytest.approx(1e-3, rel=1e-6)


def test_image(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    png = tiny_png()
    with MetricsWriter(tmp_path) as writer:
        writer.image(5, "plots/loops", png)
        with pytest.raises(ValueError, match="PNG"):
            writer.image(5, "bad", b"not a png")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    [event] = acc.Images("plots/loops")
    assert (event.step, event.width, event.height, event.encoded_image_string) == (5, 40, 20, png)


def test_flush_makes_lines_visible(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.scalars(3, {"loss": 1.0})
    writer.flush()
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.0}]
    assert read_tensorboard_scalars(tmp_path) == {"loss": [(3, 1.0)]}
    writer.close()
    writer.close()


def test_disabled_writer_writes_nothing(tmp_path):
    run = tmp_path / "run"
    writer = MetricsWriter(run, enabled=False)
    writer.scalars(1, {"loss": 1.0})
    writer.image(1, "plot", tiny_png())
    writer.flush()
    writer.close()
    assert not run.exists()
    assert read_metrics(run) == [] and read_tensorboard_scalars(run) == {}


def test_read_metrics_skips_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_progress_line():
    now = [100.0]
    line = ProgressLine(total_steps=2000, start_step=100, clock=lambda: now[0])
    assert line.format(100, {"train/loss": 2.0}, 0.0, 1e-3, {}).endswith("ETA ?")
    now[0] += 20.0  # 20 steps in 20 s -> 1880 steps left take 31m20s
    text = line.format(120, {"train/loss": 1.2345, "train/accuracy": 0.456}, 12345.0, 1e-3, {"X": 7, "Y": 3})
    assert text == (
        "step  120/2000 | loss 1.234 | acc 45.6% | 12.3k tok/s | lr 1.0e-03 | loops X=7 Y=3 | ETA 31m20s"
    )
    assert "ETA 0s" in line.format(2000, {"loss": 0.1}, 1e6, 1e-4, {})
    long_run = ProgressLine(10000, 0, clock=lambda: now[0])
    now[0] += 2.0  # 9999 steps left at 2 s/step
    assert long_run.format(1, {}, 950.0, 3e-4, {}).endswith("950 tok/s | lr 3.0e-04 | ETA 5h33m")


def test_a_disk_that_fills_under_the_tensorboard_writer_is_raised_not_printed(tmp_path, monkeypatch):
    """tensorboard's writer thread printed "Exception in thread" when the disk filled between two of its flushes,
    and `close` dropped the error: it is now raised in the caller (the trainer makes it one line), not printed."""
    import errno
    import threading

    printed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_type))
    writer = MetricsWriter(tmp_path)

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    worker = writer._tb._async_writer._worker
    monkeypatch.setattr(worker._record_writer, "write", full)
    writer.scalars(1, {"train/loss": 1.0})
    worker.join(timeout=30)  # the thread met the full disk and ended
    assert not worker.is_alive()
    with pytest.raises(OSError, match="No space left on device"):
        writer.close()
    assert printed == []
    other = threading.Thread(target=lambda: 1 / 0)  # another thread's exception still reaches the hook
    other.start()
    other.join()
    assert printed == [ZeroDivisionError]


@pytest.mark.parametrize("bad, message", [
    (b"garbage\n", r"metrics.jsonl:1: not a record of the run's metrics"),
    (b"[1, 2]\n", r"metrics.jsonl:1: not a record"),
    (b'{"loss": 1.0}\n', r"metrics.jsonl:1: not a record"),
    (b"caf\xe9\n", r"metrics.jsonl: not UTF-8 text \(bad byte at offset 3\)"),
])
def test_a_metrics_file_damaged_by_hand_is_one_line(tmp_path, bad, message):
    """#27 pass 11: a line that is not a record, anywhere but at the end (where a crash can cut one short), was a
    traceback when a resume trimmed the file (JSONDecodeError, AttributeError, UnicodeDecodeError); now one line
    naming the file and line, and the file is left as it was."""
    from loopformer.errors import CheckpointError
    from loopformer.runs.scalars import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(bad + b'{"step": 1, "loss": 2.0}\n')
    for call in (lambda: read_metrics(tmp_path), lambda: truncate_metrics(tmp_path, 1)):
        with pytest.raises(CheckpointError, match=message):
            call()
    assert path.read_bytes() == bad + b'{"step": 1, "loss": 2.0}\n'
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a torn last line is still skipped and trimmed
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}] and truncate_metrics(tmp_path, 1) == 1
