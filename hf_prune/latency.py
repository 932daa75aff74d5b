"""Latency of candidate shapes in ONNX Runtime, measured before any training, and the search over them.

Inference time depends on the shapes (heads per layer, FFN widths, hidden size), not on the values of the weights.
So a candidate made by removing units from the dense model can be exported and timed in seconds, and the pruning
level chosen before any recovery training is spent on it. Constraint-driven pruning elsewhere counts FLOPs or
parameters (NVIDIA ModelOpt) or fits a latency model (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers"); here the candidate itself is measured, in the runtime it will be served with, on this machine.

    probe = LatencyProbe(dense_model, batch_sizes=[1, 32])
    with probe:
        point = probe.measure(candidate_model, fraction=0.7)   # candidate and dense timed in the same rounds
    print(point.speedup[32], point.flop_ratio_limit)

`search_least_fraction` bisects a grid of fractions for the least pruning whose measured speedup meets a target.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .flops import encoder_flops
from .export import export_onnx
from .runtime import onnx_logits_runner
from .structure import structure_summary

PRECISIONS = ("fp32", "int8")


@dataclass
class LatencyPoint:
    """One timed candidate: its shapes, its median latency and the dense model's in the same rounds."""

    fraction: float
    heads_per_layer: list[int]
    intermediate_sizes: list[int]
    parameters: int
    flops_per_example: int
    flop_ratio_limit: float  # dense FLOPs / candidate FLOPs: the speedup that removal could give at best
    ms: dict[int, float] = field(default_factory=dict)  # batch size -> median milliseconds of the candidate
    dense_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms of dense in the same rounds
    speedup: dict[int, float] = field(default_factory=dict)  # batch size -> dense_ms / ms
    seconds: float = 0.0  # export + timing wall time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LatencyProbe:
    """Times candidate models against the dense one in ONNX Runtime on the CPU, on synthetic full-length inputs.

    Args:
        dense: the unpruned model (exported once, kept loaded).
        seq_len: tokens per example (every position attended: padding does not change the work).
        batch_sizes: batch sizes timed.
        precision: "fp32" (the plain graph, fused by ONNX Runtime at load) or "int8" (dynamic quantization) for the
            candidates; dense is always fp32, so an INT8 speedup includes what quantization buys.
        threads: intra-op threads (default: all cores, as `create_session` uses).
        rounds, repeats: interleaved rounds (candidate and dense alternate, so machine noise hits both alike) and
            timed calls per model, batch size and round; latency is the median.
        workdir: where the temporary ONNX files go (default: the system's temporary directory).
    """

    def __init__(
        self,
        dense: nn.Module,
        seq_len: int = 64,
        batch_sizes: Sequence[int] = (1, 32),
        precision: str = "fp32",
        threads: Optional[int] = None,
        rounds: int = 3,
        repeats: int = 5,
        workdir: Optional[str] = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not allowed; choose one of {list(PRECISIONS)}.")
        for name, value in (("seq_len", seq_len), ("rounds", rounds), ("repeats", repeats)):
            if value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not batch_sizes or any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes={list(batch_sizes)!r} must be positive integers.")
        self.seq_len, self.batch_sizes, self.precision = seq_len, list(batch_sizes), precision
        self.threads, self.rounds, self.repeats = threads, rounds, repeats
        self.dense_flops = encoder_flops(dense, seq_len)
        self.workdir = Path(tempfile.mkdtemp(prefix="hf_prune_latency_", dir=workdir))
        self._count = 0
        vocab = int(getattr(dense.config, "vocab_size", 1000))
        ids = np.random.default_rng(0).integers(min(1000, vocab - 1), vocab, size=(max(self.batch_sizes), seq_len))
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64),
                "token_type_ids": np.zeros_like(ids, dtype=np.int64)}
        self.batches = {b: {k: np.ascontiguousarray(v[:b]) for k, v in feed.items()} for b in self.batch_sizes}
        self._dense = self._runner(dense, "fp32")

    def _runner(self, model: nn.Module, precision: str) -> Callable[[dict], Any]:
        self._count += 1
        out = self.workdir / f"candidate-{self._count}"
        result = export_onnx(model, out, optimize=None, quantize="dynamic" if precision == "int8" else None,
                             verify=False, sparse_initializers="never")
        path = out / result.files["int8" if precision == "int8" else "fp32"]
        run = onnx_logits_runner(path, self.threads)  # the session holds the graph: the files can go
        shutil.rmtree(out, ignore_errors=True)
        for batch in self.batches.values():
            run(batch)  # warm-up: allocations, kernel selection
        return run

    def _time(self, run: Callable[[dict], Any], batch: dict) -> list[float]:
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
        return times

    def measure(self, model: nn.Module, fraction: float) -> LatencyPoint:
        """Export `model` (a copy is exported; it is not changed) and time it against dense in the same rounds."""
        start = time.perf_counter()
        summary = structure_summary(model)
        flops = encoder_flops(model, self.seq_len)
        point = LatencyPoint(
            fraction=fraction, heads_per_layer=list(summary["heads_per_layer"]),
            intermediate_sizes=list(summary["intermediate_sizes"]),
            parameters=sum(p.numel() for p in model.parameters()), flops_per_example=flops,
            flop_ratio_limit=self.dense_flops / flops,
        )
        run = self._runner(model, self.precision)
        candidate_times = {b: [] for b in self.batch_sizes}
        dense_times = {b: [] for b in self.batch_sizes}
        for _ in range(self.rounds):
            for b, batch in self.batches.items():
                dense_times[b] += self._time(self._dense, batch)
                candidate_times[b] += self._time(run, batch)
        for b in self.batch_sizes:
            point.ms[b] = statistics.median(candidate_times[b]) * 1000
            point.dense_ms[b] = statistics.median(dense_times[b]) * 1000
            point.speedup[b] = point.dense_ms[b] / point.ms[b]
        point.seconds = time.perf_counter() - start
        return point

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LatencyProbe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fraction_grid(step: float, max_fraction: float) -> list[float]:
    """step, 2*step, ... up to max_fraction (inclusive, rounded to 4 places): the candidate pruning fractions."""
    if not 0.0 < step < 1.0:
        raise ValueError(f"step={step!r} must lie in (0, 1).")
    if not step <= max_fraction < 1.0:
        raise ValueError(f"max_fraction={max_fraction!r} must lie in [step, 1).")
    count = int(max_fraction / step + 1e-9)  # floor: never a step past max_fraction (0.25 to 0.9 stops at 0.75)
    grid = [round(step * i, 4) for i in range(1, count + 1)]
    if grid[-1] < max_fraction - 1e-9:
        grid.append(round(max_fraction, 4))
    return grid


def search_least_fraction(
    measure: Callable[[float], LatencyPoint],
    grid: Sequence[float],
    goal: float,
    batch_size: int,
    progress: bool = True,
) -> tuple[LatencyPoint, list[LatencyPoint], bool]:
    """Bisect `grid` (increasing fractions) for the least fraction whose speedup at `batch_size` reaches `goal`.

    Latency falls as more is removed, so a bisection needs about log2(len(grid)) + 1 measurements. The largest
    fraction is measured first: if even it falls short, it is returned as the closest point with `met=False`.

    Returns:
        (chosen point, every point measured in the order measured, met).
    """
    if not grid:
        raise ValueError("grid is empty: give at least one candidate fraction.")
    tried: list[LatencyPoint] = []
    bar = tqdm(total=int(np.ceil(np.log2(len(grid)))) + 1, desc="timing candidate shapes", unit="shape",
               disable=not progress)

    def at(index: int) -> LatencyPoint:
        point = measure(grid[index])
        tried.append(point)
        bar.update()
        bar.set_postfix(fraction=f"{point.fraction:.0%}", speedup=f"{point.speedup[batch_size]:.2f}x")
        return point

    try:
        top = at(len(grid) - 1)
        if top.speedup[batch_size] < goal:
            return top, tried, False
        best, low, high = top, 0, len(grid) - 2  # best meets the goal; search below it
        while low <= high:
            middle = (low + high) // 2
            point = at(middle)
            if point.speedup[batch_size] >= goal:
                best, high = point, middle - 1
            else:
                low = middle + 1
        return best, tried, True
    finally:
        bar.total = bar.n  # a bisection may stop early: end the bar at 100%
        bar.refresh()
        bar.close()
