"""The pruning engine: scores, schedule and masks for one model, in plain PyTorch.

`Pruner` knows nothing about `Trainer`; the callbacks and `PruningTrainer` call the same four methods at the same
points of an optimizer step, so both paths produce the same masks:

    after backward, before the optimizer step   -> `before_optimizer_step()`  (scores, gradient masking)
    after the optimizer step                    -> `after_optimizer_step()`   (pruned weights back to exactly 0)
    after the step counter moved                -> `update(step)`             (new masks when the schedule says)

Zeroing after every optimizer step is what keeps pruned weights at exactly zero under Adam, whose moments would
otherwise move them again, and under any autocast dtype, since the fp32 master weights are the ones masked.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch
from torch import nn
from transformers.utils import logging

from .config import PruningConfig
from .masks import (
    check_pattern_fits,
    expand_units,
    find_target_modules,
    is_prunable_module,
    matrix_view,
    select_lowest,
    unit_scores,
)
from .schedules import SparsitySchedule
from .scores import accumulate_movement, magnitude_scores, movement_score_gradient
from .structured import StructuredPruner

logger = logging.get_logger(__name__)

STATE_NAME = "hf_prune_state.pt"


class Pruner:
    """Gradual pruning of the targeted Linear layers of `model` according to `config`.

    Args:
        model: the model being trained (its parameters are zeroed in place).
        config: a validated `PruningConfig`.
    """

    def __init__(self, model: nn.Module, config: PruningConfig) -> None:
        self.config = config
        self.model = model
        self.modules = find_target_modules(model, config.targets, config.exclude)
        if not self.modules:
            raise ValueError(
                f"PruningConfig.targets={config.targets} (exclude={config.exclude}) matches no nn.Linear/Conv1D module "
                f"of {type(model).__name__}. Prunable modules are, for example: "
                f"{_example_names(model)}."
            )
        for pattern in config.targets:
            if not any(_search(pattern, name) for name in self.modules):
                raise ValueError(
                    f"PruningConfig.targets entry {pattern!r} matches no prunable module of {type(model).__name__}; "
                    f"prunable modules are, for example: {_example_names(model)}."
                )
        for pattern in config.sparsity_overrides:
            if not any(_search(pattern, name) for name in self.modules):
                raise ValueError(
                    f"PruningConfig.sparsity_overrides key {pattern!r} matches no targeted module; targeted modules "
                    f"are, for example: {list(self.modules)[:4]}."
                )
        for name, module in self.modules.items():
            check_pattern_fits(name, module, config)

        # Modules with an override are ranked among themselves; all others share the global target.
        self.override_of: dict[str, float] = {}
        for name in self.modules:
            for pattern, sparsity in config.sparsity_overrides.items():
                if _search(pattern, name):
                    self.override_of[name] = float(sparsity)
                    break

        self.masks: dict[str, Optional[torch.Tensor]] = {name: None for name in self.modules}
        self.scores: dict[str, torch.Tensor] = {}
        if config.method == "movement":
            self.scores = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in self.modules.items()}
        elif config.method == "soft_movement":
            # Learned scores start at |W| scaled to ~[0, 1]: ranking by magnitude until movement says otherwise.
            self.scores = {n: nn.Parameter(_normalised_magnitude(m.weight)) for n, m in self.modules.items()}
        self.structured: Optional[StructuredPruner] = None
        if config.head_sparsity > 0 or config.neuron_sparsity > 0:
            self.structured = StructuredPruner(model, config)
        self.finished = False
        self.schedule: Optional[SparsitySchedule] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.last_update_step = 0
        self.scheduled_sparsity = 0.0

    # ----------------------------------------------------------------------------------------- training-step hooks
    def start(self, total_steps: int) -> None:
        """Fix the schedule once the number of optimizer steps is known."""
        self.schedule = SparsitySchedule.from_config(self.config, total_steps)
        logger.info(
            "hf_prune: %s pruning of %d modules (%d weights) to %.1f%% sparsity, %s schedule over steps %d-%d",
            self.config.method,
            len(self.modules),
            self.num_targeted,
            100 * self.config.target_sparsity,
            self.schedule.kind,
            self.schedule.start_step,
            self.schedule.end_step,
        )

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Score from the complete gradients, then hide pruned weights from the optimizer."""
        method = self.config.method
        for name, module in self.modules.items():
            weight, grad = module.weight, module.weight.grad
            if grad is None:
                continue
            if method == "movement":
                accumulate_movement(self.scores[name], weight, grad)
            elif method == "soft_movement":
                score = self.scores[name]
                update = movement_score_gradient(weight, grad)
                score.grad = update if score.grad is None else score.grad.add_(update)
            mask = self.masks[name]
            if mask is not None:
                grad.masked_fill_(mask, 0.0)
        if self.structured is not None:
            self.structured.accumulate()
            self.structured.mask_gradients()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        # Learned scores live outside the model, so nothing else clears their gradients.
        for score in self.score_parameters():
            score.grad = None
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.finished:
            return  # structures were removed: shapes changed and the zeros are final
        for name, module in self.modules.items():
            mask = self.masks[name]
            if mask is not None:
                module.weight.masked_fill_(mask, 0.0)
        if self.structured is not None:
            self.structured.apply_masks()

    def update(self, step: int) -> bool:
        """Recompute masks if `step` is a scheduled pruning step; returns whether it was."""
        if self.schedule is None:
            raise RuntimeError("Pruner.start(total_steps) must be called before update().")
        if not self.schedule.is_update_step(step):
            return False
        if self.config.target_sparsity > 0 or self.config.sparsity_overrides:
            self.prune_to(self.schedule.sparsity_at(step))
        if self.structured is not None:
            self.structured.prune_to(
                self.schedule.sparsity_at(step, self.config.head_sparsity),
                self.schedule.sparsity_at(step, self.config.neuron_sparsity),
            )
            self.structured.clear_optimizer_state(self.optimizer)
        self.last_update_step = step
        return True

    def finish(self) -> Optional[dict]:
        """End of training: masks applied a last time, masked heads/neurons removed physically if configured.

        Returns what was removed ({"heads": ..., "neurons": ...}) or None.
        """
        self.apply_masks()
        if self.structured is None or not self.config.remove_structures or self.finished:
            return None
        removed = self.structured.remove()
        self.finished = True
        return removed

    # -------------------------------------------------------------------------------------------------- masks
    def importance(self, name: str) -> torch.Tensor:
        """(out, in) float32 scores of one module under the configured method; higher is kept."""
        module = self.modules[name]
        if self.config.method == "magnitude":
            scores = magnitude_scores(module.weight)
        else:
            scores = self.scores[name].detach()
        return matrix_view(module, scores)

    def _ranking_scores(self, name: str) -> torch.Tensor:
        # Pruning is monotone: a pruned weight is already zero, and letting it back in would restart it from zero
        # while the report counted it as pruned. Ranking it below everything keeps it pruned.
        scores = self.importance(name)
        mask = self.masks[name]
        if mask is not None:
            scores = scores.masked_fill(matrix_view(self.modules[name], mask), float("-inf"))
        return scores

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Set masks so that the targeted weights reach `sparsity` (overridden modules: their own share) now."""
        schedule_target = self.config.target_sparsity
        groups: dict[str, list[str]] = {}
        for name in self.modules:
            if name in self.override_of:
                groups[f"override:{name}"] = [name]
            elif self.config.scope == "local":
                groups[f"local:{name}"] = [name]
            else:
                groups.setdefault("global", []).append(name)
        for key, names in groups.items():
            target = sparsity
            if key.startswith("override:"):
                final = self.override_of[names[0]]
                # Same progress along the schedule as the global target, towards the module's own target.
                target = final * (sparsity / schedule_target) if schedule_target > 0 else final
            units = [unit_scores(self._ranking_scores(n), self.config) for n in names]
            for name, pruned_units in zip(names, select_lowest(units, target)):
                module = self.modules[name]
                shape = matrix_view(module).shape
                mask = expand_units(pruned_units, shape, self.config)
                self.masks[name] = mask.t().contiguous() if type(module).__name__ == "Conv1D" else mask
        self.scheduled_sparsity = sparsity
        self.apply_masks()
        self._clear_optimizer_state()

    def attach_optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Let mask updates clear the optimizer state (e.g. Adam moments) of newly pruned weights."""
        self.optimizer = optimizer

    @torch.no_grad()
    def _clear_optimizer_state(self) -> None:
        # Stale momentum would keep pushing a pruned weight; masking it each step hides that, clearing it removes it.
        if self.optimizer is None:
            return
        for name, module in self.modules.items():
            mask = self.masks[name]
            state = self.optimizer.state.get(module.weight, {}) if mask is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.masked_fill_(mask, 0.0)

    # ------------------------------------------------------------------------------------------ soft movement
    def score_parameters(self) -> list[nn.Parameter]:
        return list(self.scores.values()) if self.config.method == "soft_movement" else []

    def regularization(self) -> torch.Tensor:
        """Mean sigmoid of the learned scores: pushes unneeded scores down (Sanh et al. 2020, soft movement)."""
        params = self.score_parameters()
        total = sum(torch.sigmoid(p).sum() for p in params)
        return total / self.num_targeted

    # ----------------------------------------------------------------------------------------------- reporting
    @property
    def num_targeted(self) -> int:
        return sum(m.weight.numel() for m in self.modules.values())

    @torch.no_grad()
    def measured_sparsity(self) -> float:
        """Fraction of targeted weights that are exactly zero, counted on the weights (not on the masks)."""
        if self.finished:  # modules were rebuilt by structural removal
            from .masks import sparsity_report

            return sparsity_report(self.model, self.config.targets, self.config.exclude)["global_sparsity"]
        zeros = sum(int((m.weight == 0).sum()) for m in self.modules.values())
        return zeros / self.num_targeted

    def log_metrics(self) -> dict[str, float]:
        metrics = {
            "sparsity": round(self.measured_sparsity(), 6),
            "scheduled_sparsity": round(self.scheduled_sparsity, 6),
        }
        if self.structured is not None:
            metrics.update({k: round(v, 6) for k, v in self.structured.log_metrics().items()})
        return metrics

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "masks": {n: m for n, m in self.masks.items() if m is not None},
            "scores": {n: s.detach().clone() for n, s in self.scores.items()},
            "last_update_step": self.last_update_step,
            "scheduled_sparsity": self.scheduled_sparsity,
            "structured": None if self.structured is None else self.structured.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["masks"]) - set(self.modules)
        if unknown:
            raise ValueError(f"Pruning state holds masks for modules this model does not target: {sorted(unknown)[:4]}")
        for name, module in self.modules.items():
            mask = state["masks"].get(name)
            self.masks[name] = None if mask is None else mask.to(module.weight.device)
        for name, saved in state["scores"].items():
            self.scores[name].copy_(saved)
        self.last_update_step = state["last_update_step"]
        self.scheduled_sparsity = state["scheduled_sparsity"]
        if self.structured is not None and state.get("structured") is not None:
            self.structured.load_state_dict(state["structured"])
        self.apply_masks()

    def save(self, directory: str) -> str:
        path = os.path.join(directory, STATE_NAME)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # never leave a half-written state beside a good checkpoint
        return path

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True)
        self.load_state_dict(state)


def _search(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def _example_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_prunable_module(m)][:6]


def _normalised_magnitude(weight: torch.Tensor) -> torch.Tensor:
    magnitude = weight.detach().abs().float()
    return magnitude / magnitude.max().clamp_min(1e-12)
