"""Analytic FLOPs of a looped model, and the peak FLOP/s that MFU is measured against.

Counting rules (one multiply-add = 2 FLOPs; matmuls only: norms, softmax, RoPE and the loss are
left out, as in the PaLM/Chinchilla convention):

    block(W, F, T)  = 8 W^2                      qkv (6 W^2) + out projection (2 W^2)
                    + 4 W F   (gelu)             up + down;  6 W F for swiglu (gate, up, down)
                    + 4 W ctx                    QK^T and AV, ctx = (T + 1) / 2 tokens on average
                                                 under the causal mask (T when ``causal=False``)

    forward / token = 2 d V                      head (tied or not; the embedding lookup is free)
                    + (prelude + coda) block(d, F_d, T)
                    + sum over circuits c:  2 d w_c [read: project]  +  2 w_c w_out [write]
                                          + n_c (D_c block(w_c, F_c, T) + 4 w_c^2 [inject: concat])

Training (``train_flops_per_token``): backward = 2 x forward, but a circuit with truncation depth k
only backpropagates through its last min(n, k) iterations; its first n - k run forward only. So

    model FLOPs     = 3 x (everything outside the loops) + per circuit: (n + 2 min(n, k)) x iteration

``hardware=True`` counts what the compiled step really executes on top of that: the gradient
scan always runs k iterations (surplus ones masked when n < k), and its body is rematerialised by
``jax.checkpoint`` (one extra forward per gradient iteration):

    hardware FLOPs  = 3 x (outside the loops) + per circuit: (max(n, k) + 2 k + k) x iteration

MFU (model FLOPs utilisation) uses model FLOPs; HFU uses hardware FLOPs.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from loopformer.config import ModelConfig
from loopformer.errors import ConfigError, unplain_digits

# Dense (no sparsity) peak FLOP/s per JAX device from vendor datasheets: (bf16, fp32-matmul).
# fp32 matmuls run as TF32 on NVIDIA (XLA's default precision) and as bf16 passes on TPU. A TPU v2/v3
# JAX device is one TensorCore (half a chip); from v4 on a device is a chip.
DATASHEET_PEAKS: tuple[tuple[str, float, float], ...] = (
    # (substring of device.device_kind, bf16 FLOP/s, fp32 FLOP/s)
    ("TPU v2", 22.5e12, 22.5e12),
    ("TPU v3", 61.5e12, 61.5e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v6 lite", 918e12, 918e12),
    ("TPU v6e", 918e12, 918e12),
    ("TPU7x", 2307e12, 2307e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989e12, 495e12),  # SXM
    ("H200", 989e12, 495e12),
    ("GH200", 989e12, 495e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("L4", 121e12, 60e12),
)


def _block(width: int, hidden: int, mlp: str, ctx: float) -> float:
    return 8.0 * width**2 + (6.0 if mlp == "swiglu" else 4.0) * width * hidden + 4.0 * width * ctx


@dataclass(frozen=True)
class FlopCounter:
    """Per-token FLOPs of one model at a sequence length; loop counts are call arguments, either a
    mapping {circuit: n} (missing circuits: their eval_loops) or a sequence in circuit order."""

    cfg: ModelConfig
    vocab_size: int
    seq_len: int
    causal: bool = True

    @functools.cached_property
    def _parts(self) -> tuple[float, np.ndarray, np.ndarray]:
        """(outside-the-loops forward FLOPs, per-iteration FLOPs [C], truncation depths [C])."""
        m = self.cfg
        ctx = (self.seq_len + 1) / 2 if self.causal else float(self.seq_len)
        d = m.d_model
        outside = 2.0 * d * self.vocab_size
        outside += (m.prelude + m.coda) * _block(d, m.mlp_hidden, m.mlp, ctx)
        per_iter, ks = [], []
        for c in m.circuits():
            w = c.width
            if c.io == "project":
                outside += 2.0 * d * w
            outside += 2.0 * w * (w if c.io == "slice" else d)
            per_iter.append(c.depth * _block(w, c.mlp_hidden, m.mlp, ctx) + (4.0 * w * w if c.inject == "concat" else 0.0))
            ks.append(c.backprop)
        return outside, np.asarray(per_iter), np.asarray(ks, np.float64)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cfg.circuits()]

    def _loops(self, loops: Mapping[str, float] | Sequence[float] | np.ndarray | None) -> np.ndarray:
        if loops is None or isinstance(loops, Mapping):
            given = dict(loops or {})
            unknown = set(given) - set(self.names)
            if unknown:
                raise KeyError(f"unknown circuits {sorted(unknown)}; circuits are {self.names}")
            return np.asarray([float(given.get(c.name, c.eval_loops)) for c in self.cfg.circuits()])
        arr = np.asarray(loops, np.float64)
        if arr.shape[-1] != len(self.names):
            raise ValueError(f"expected loop counts for {len(self.names)} circuits {self.names}, got shape {arr.shape}")
        return arr

    def forward(self, loops: Mapping[str, float] | Sequence[float] | np.ndarray | None = None) -> float | np.ndarray:
        """Forward FLOPs per token (inference at these loop counts); ``loops`` may also be an array [steps, C],
        giving one value per step."""
        outside, per_iter, _ = self._parts
        out = outside + np.sum(self._loops(loops) * per_iter, axis=-1)
        return float(out) if np.ndim(out) == 0 else out

    def routing(self) -> float:
        """FLOPs per token of one round of the model's routed stage: each circuit's write into the stream and
        the router's scores (a linear map of the normed stream to one score per circuit, plus the exit), which
        every token of the batch gets at every round the bank runs (0 without a router). With ``router.inputs``
        also the latent change of the states (a difference, two squares and two sums over each circuit's width)
        and the map of the F inputs to the scores."""
        for stage in self.cfg.stages:
            if stage.router.routes:
                d = self.cfg.d_model
                writes = sum(2.0 * c.width * (c.width if c.io == "slice" else d) for c in stage.circuits)
                scores = len(stage.circuits) + int(stage.router.exit)
                inputs = len(stage.router.inputs)
                sensed = (5.0 * sum(c.width for c in stage.circuits) + (2.0 * scores + 1.0) * inputs) if inputs else 0.0
                return writes + 2.0 * d * scores + sensed
        return 0.0

    def readout(self) -> float:
        """FLOPs per token of one read of the logits from the stream (the coda's blocks and the head): what
        an exit rule that compares output distributions (kl, entropy_diff) adds per executed iteration."""
        m = self.cfg
        ctx = (self.seq_len + 1) / 2 if self.causal else float(self.seq_len)
        return 2.0 * m.d_model * self.vocab_size + m.coda * _block(m.d_model, m.mlp_hidden, m.mlp, ctx)

    def train(self, loops: Mapping[str, float] | Sequence[float] | np.ndarray | None = None, *,
              hardware: bool = False) -> float | np.ndarray:
        """Training FLOPs per token (forward + backward) at these loop counts; ``loops`` may also be an
        array [steps, C], giving one value per step. ``hardware``: count masked surplus gradient
        iterations and the jax.checkpoint recompute (HFU) instead of useful work only (MFU)."""
        outside, per_iter, k = self._parts
        n = self._loops(loops)
        iters = np.maximum(n, k) + 3 * k if hardware else n + 2 * np.minimum(n, k)
        out = 3 * outside + np.sum(iters * per_iter, axis=-1)
        return float(out) if np.ndim(out) == 0 else out


# ----------------------------------------------------------------------------- peak FLOP/s


def datasheet_peak(device: jax.Device | None = None, dtype: str = "bfloat16") -> float | None:
    """Vendor peak FLOP/s of one device, or None when the kind is unknown (CPUs among them)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for key, bf16, fp32 in DATASHEET_PEAKS:
        if key.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def measure_matmul_flops(size: int = 2048, dtype: str = "float32", reps: int = 5,
                         device: jax.Device | None = None) -> float:
    """Achieved FLOP/s of a square ``size`` matmul on one device (best of ``reps`` timed runs)."""
    device = device or jax.local_devices()[0]
    key = jax.random.key(0)
    a = jax.device_put(jax.random.normal(key, (size, size), jnp.dtype(dtype)), device)
    b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (size, size), jnp.dtype(dtype)), device)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


PEAK_ENV = "LOOPFORMER_PEAK_FLOPS"
# No device JAX runs on is slower than this (one CPU core does ~1e10): a peak below it is a unit slip (989 meant as
# TFLOP/s) or a typo, and its MFU would be past 100 % by orders of magnitude, infinite at 1e-320 (written to
# metrics.jsonl as `Infinity`, which is not JSON; #27 pass 24's leftover).
PEAK_FLOOR = 1e6


def peak_override() -> float | None:
    """``LOOPFORMER_PEAK_FLOPS`` (FLOP/s per device), or None when unset; ConfigError for anything but a finite number
    >= `PEAK_FLOOR` (it was a ValueError or ZeroDivisionError traceback at the first logged step, a negative MFU, or
    an infinite one)."""
    text = os.environ.get(PEAK_ENV)
    if not text:
        return None
    odd = unplain_digits(text)  # float() reads 9.89e1_4 and ٩e14 (#27 pass 42)
    if odd:
        raise ConfigError(f"environment variable {PEAK_ENV}={text!r}: {odd}")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ConfigError(f"environment variable {PEAK_ENV}={text!r} must be a finite number of FLOP/s per device > 0, "
                          f"e.g. 9.89e14 (or unset it: the peak is then the datasheet's or measured)")
    if value < PEAK_FLOOR:
        raise ConfigError(f"environment variable {PEAK_ENV}={text!r} is below {PEAK_FLOOR:.0e} FLOP/s per device, "
                          f"slower than any device (it is in FLOP/s, not TFLOP/s: 989 TFLOP/s is 9.89e14); give the "
                          f"device's peak, e.g. 9.89e14, or unset it")
    return value


@functools.cache
def peak_flops(dtype: str = "float32", matmul_size: int = 1024) -> tuple[float, str]:
    """Peak FLOP/s of all devices of the job together, and where the number comes from.

    Accelerators: the datasheet peak per device (bf16 for bfloat16 models; TF32 for float32 models
    on NVIDIA) times ``jax.device_count()``. CPU (virtual devices share the cores): a ``matmul_size``
    matmul measured on this host, times the number of processes. ``LOOPFORMER_PEAK_FLOPS`` (per
    device) overrides both.
    """
    override = peak_override()
    if override:
        return override * jax.device_count(), PEAK_ENV
    device = jax.devices()[0]
    peak = datasheet_peak(device, dtype)
    if peak is not None:
        return peak * jax.device_count(), f"datasheet {device.device_kind} {dtype} x {jax.device_count()}"
    measured = measure_matmul_flops(matmul_size, dtype, reps=3)
    return measured * jax.process_count(), f"measured {matmul_size}^3 {dtype} matmul on {device.platform} x " \
                                           f"{jax.process_count()} host(s)"
