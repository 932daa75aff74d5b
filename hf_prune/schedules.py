"""Sparsity as a function of the optimizer step.

Gradual pruning removes weights over many steps so that the remaining ones can take over their work (Zhu & Gupta
2017, "To prune, or not to prune"). The schedule decides *how much* is pruned at a step; scores decide *which*.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PruningConfig


@dataclass(frozen=True)
class SparsitySchedule:
    """Sparsity between `start_step` and `end_step` (inclusive), constant outside.

    Masks are updated every `interval` steps from `start_step` on, and always at `end_step`, so the target is reached
    exactly at `end_step` whatever the interval.
    """

    kind: str
    initial_sparsity: float
    target_sparsity: float
    start_step: int
    end_step: int
    interval: int

    @classmethod
    def from_config(cls, config: PruningConfig, total_steps: int) -> "SparsitySchedule":
        if total_steps < 1:
            raise ValueError(f"Pruning needs a known number of training steps (max_steps), got {total_steps}.")
        start = int(round(config.warmup_fraction * total_steps))
        end = int(round((1.0 - config.cooldown_fraction) * total_steps))
        # Step numbers are Trainer global steps, counted after the optimizer step: the first is 1.
        start = min(max(start, 1), total_steps)
        end = min(max(end, start), total_steps)
        if config.schedule == "one_shot":
            end = start
        return cls(config.schedule, config.initial_sparsity, config.target_sparsity, start, end, config.pruning_interval)

    def sparsity_at(self, step: int, target: float | None = None) -> float:
        """Scheduled sparsity after `step` optimizer steps (towards `target`, default the global target)."""
        final = self.target_sparsity if target is None else target
        initial = min(self.initial_sparsity, final)
        if step < self.start_step:
            return 0.0
        if step >= self.end_step or self.kind == "one_shot":
            return final
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        if self.kind == "cubic":
            return final + (initial - final) * (1.0 - progress) ** 3
        return initial + (final - initial) * progress

    def is_update_step(self, step: int) -> bool:
        """Whether masks are recomputed after `step`."""
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.interval == 0
