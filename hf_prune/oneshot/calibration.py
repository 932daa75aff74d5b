"""Calibration batches for one-shot pruning: token windows cut from a long text at seeded offsets."""

from __future__ import annotations

import random

import torch


def calibration_windows(ids: list[int], samples: int, length: int, batch_size: int, seed: int) -> list[dict]:
    """`samples` windows of `length` tokens at seeded random offsets of `ids`, in batches."""
    if len(ids) <= length:
        raise ValueError(f"The calibration text has {len(ids)} tokens; --calibration_length {length} needs more.")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - length) for _ in range(samples)]
    windows = torch.tensor([ids[s:s + length] for s in starts])
    return [{"input_ids": windows[i:i + batch_size], "attention_mask": torch.ones_like(windows[i:i + batch_size])}
            for i in range(0, samples, batch_size)]
