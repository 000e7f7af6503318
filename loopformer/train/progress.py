"""The trainer's console progress line: step, metrics, throughput, learning rate, loops, ETA."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def _format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _format_rate(x: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= threshold:
            return f"{x / threshold:.1f}{suffix}"
    return f"{x:.0f}"


class ProgressLine:
    """Formats the console progress line; the ETA extrapolates the wall time since construction."""

    def __init__(self, total_steps: int, start_step: int, *, clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.start_step = start_step
        self._clock = clock
        self._start_time = clock()

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at the average pace since construction (None before the first step)."""
        done, elapsed = step - self.start_step, self._clock() - self._start_time
        if done <= 0 or elapsed <= 0:
            return None
        return max(self.total_steps - step, 0) * elapsed / done

    def format(
        self,
        step: int,
        metrics: Mapping[str, float],
        tokens_per_s: float,
        lr: float,
        loops: Mapping[str, int],
    ) -> str:
        """One console line, e.g.

        "step  120/2000 | loss 1.234 | acc 45.6% | 12.3k tok/s | lr 1.0e-03 | loops X=7 Y=3 | ETA 3m12s"

        Metric names lose a "train/" prefix; accuracies are shown as percentages.
        """
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        for name, value in metrics.items():
            name = name.removeprefix("train/")
            if name in ("acc", "accuracy") or name.endswith("/accuracy"):
                parts.append(f"{name.replace('accuracy', 'acc')} {100 * float(value):.1f}%")
            else:
                parts.append(f"{name} {float(value):.4g}")
        parts.append(f"{_format_rate(tokens_per_s)} tok/s")
        parts.append(f"lr {lr:.1e}")
        if loops:
            parts.append("loops " + " ".join(f"{k}={v}" for k, v in loops.items()))
        eta = self.eta_seconds(step)
        parts.append(f"ETA {'?' if eta is None else _format_duration(eta)}")
        return " | ".join(parts)
