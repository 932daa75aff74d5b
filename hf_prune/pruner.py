"""The pruning engine: scores, schedule and masks for one model, in plain PyTorch.

`Pruner` knows nothing about `Trainer`; the callbacks and `PruningTrainer` call the same methods at the same points
of an optimizer step, so both paths produce the same masks:

    after backward, before the optimizer step   -> `before_optimizer_step()`  (scores, gradient masking)
    after the optimizer step                    -> `after_optimizer_step()`   (pruned weights back to exactly 0)
    after the step counter moved                -> `update(step)`             (new masks when the schedule says)

Which weights matter is the registered criterion's business (`hf_prune.methods`); how much is pruned when is the
schedule's; which pattern the zeros take is `masks`'. Zeroing after every optimizer step is what keeps pruned
weights at exactly zero under any optimizer and autocast dtype, since the fp32 master weights are the ones masked.

Every per-step operation is one batched `torch._foreach_*` call over all targeted weights (multiplying by 0/1
keep-masks cached in the weights' dtype), not a Python loop of small ops: the engine must cost almost nothing
next to a training step.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import logging

from .config import PruningConfig
from .files import atomic_torch_save
from .linear import is_prunable_module, matrix_view, stored_layout
from .masks import (
    check_pattern_fits,
    config_sparsity_report,
    expand_units,
    find_target_modules,
    select_lowest,
    unit_scores,
)
from .methods import PruningMethod, available_methods, get_method
from .methods.base import input_observer, same_dtype
from .optim import keep_optimizer_state
from .schedules import SparsitySchedule
from .sharding import check_unsharded, full, is_sharded, shard_like
from .torch_prune import fold_torch_prune
from .units.gradual import GradualUnitPruner

logger = logging.get_logger(__name__)

STATE_NAME = "hf_prune_state.pt"
# Version of `hf_prune_state.pt`. 1: scores at the top level; 2: the method's own state under "method".
STATE_FORMAT_VERSION = 2
# PruningConfig fields that shape the masks: a resume that changes one of them is refused unless allowed.
RESUME_SENSITIVE_FIELDS = (
    "method", "target_sparsity", "initial_sparsity", "schedule", "warmup_fraction", "cooldown_fraction",
    "pruning_interval", "granularity", "block_shape", "n_m", "scope", "targets", "exclude", "head_sparsity",
    "neuron_sparsity", "sparsity_overrides",
)
# Fields that shape one method's state: checked only when that method runs (a magnitude run ignores obs_*).
METHOD_RESUME_FIELDS = {"obs": ("obs_block_size", "obs_num_gradients", "obs_damp")}


def _normalized(value: Any) -> Any:
    # Saved configs went through torch.save; lists may come back as tuples and numbers as ints or floats.
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalized(v) for k, v in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


class Pruner:
    """Gradual pruning of the targeted Linear layers of `model` according to `config`.

    Args:
        model: the model being trained (its parameters are zeroed in place).
        config: a validated `PruningConfig`.
    """

    def __init__(self, model: nn.Module, config: PruningConfig) -> None:
        if not isinstance(config, PruningConfig):
            raise TypeError(f"Pruner takes a PruningConfig, got {type(config).__name__}.")
        # Checked again here, where it is used: a config changed after construction (config.target_sparsity = 2.0
        # in a notebook) would otherwise fail deep inside training, or not at all.
        config.validate()
        self.config = config
        self.model = model
        method_cls = config.method_class()
        if method_cls.one_shot_only:
            raise ValueError(
                f"PruningConfig.method={config.method!r} prunes once from calibration data and updates the kept weights; "
                "it has no gradual form for training. Use hf_prune.oneshot(model, calibration_dataloader, "
                f"config=PruningConfig(method={config.method!r}, ...)), then fine-tune with method='constant' to keep "
                f"its zeros; gradual methods are {[m for m in available_methods() if not get_method(m).one_shot_only]}."
            )
        check_unsharded(model)
        fold_torch_prune(model)  # blog-recipe wrappers: rank and save plain weights, not a weight rebuilt per forward
        self.modules = _one_module_per_weight(find_target_modules(model, config.targets, config.exclude))
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
        # Whether the weights were DTensors when this Pruner was built: accelerate shards (FSDP2) in place, after
        # Trainer built the Pruner, and the callback then builds a new one.
        self.sharded = any(is_sharded(m.weight) for m in self.modules.values())
        if self.sharded and (
                config.method_class().requires_trainer or config.head_sparsity > 0 or config.neuron_sparsity > 0):
            raise ValueError(
                f"hf_prune: under FSDP2 (sharded parameters) PruningConfig.method={config.method!r}, head_sparsity="
                f"{config.head_sparsity} and neuron_sparsity={config.neuron_sparsity} are not supported yet: use a "
                "method without learnable scores (magnitude, movement) and no head/neuron pruning, or DDP."
            )

        # Modules with an override are ranked among themselves; all others share the global target.
        self.override_of: dict[str, float] = {
            name: sparsity for name in self.modules if (sparsity := config.sparsity_override(name)) is not None
        }

        self.method: PruningMethod = method_cls(config)
        self.method.attach(self.modules)
        # Criteria that read input activations (Wanda) see each training forward pass of the targeted layers.
        self._input_hooks = [
            module.register_forward_pre_hook(input_observer(self.method, name, training_only=True))
            for name, module in self.modules.items()
        ] if method_cls.needs_inputs else []
        self.masks: dict[str, Optional[torch.Tensor]] = {name: None for name in self.modules}
        self._keep: dict[str, torch.Tensor] = {}  # 1 where kept, 0 where pruned, in the weight's dtype
        self.units: Optional[GradualUnitPruner] = None
        if config.head_sparsity > 0 or config.neuron_sparsity > 0:
            self.units = GradualUnitPruner(model, config)
        self.finished = False
        self.schedule: Optional[SparsitySchedule] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.last_update_step = 0
        # fp16 with a GradScaler: a step the scaler skips (inf/NaN gradients) is not a pruning step. Set by the
        # callback from TrainingArguments.fp16; the check costs a pass over the gradients, so only then.
        self.check_finite_gradients = False
        self.skipped_steps = 0
        self._skip_next_update = False
        self.scheduled_sparsity = 0.0
        if method_cls.fixed_masks:
            # The zeros the model has now (one-shot pruning, an earlier run) are the masks, for the whole run.
            self.set_masks({name: full(module.weight.detach()) == 0 for name, module in self.modules.items()})
            self.scheduled_sparsity = self.measured_sparsity()

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """The criterion's score tensors by module name (empty for criteria without state, e.g. magnitude)."""
        return getattr(self.method, "score_tensors", {})

    # ----------------------------------------------------------------------------------------- training-step hooks
    def start(self, total_steps: int) -> None:
        """Fix the schedule once the number of optimizer steps is known."""
        self.schedule = SparsitySchedule.from_config(self.config, total_steps)
        if self.method.fixed_masks:
            logger.info("hf_prune: keeping the %.1f%% zeros of %d modules (%d weights) fixed while training",
                        100 * self.scheduled_sparsity, len(self.modules), self.num_targeted)
            return
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
        if self.finished:
            return
        if self.method.needs_gradients:
            names, weights, grads = [], [], []
            for name, module in self.modules.items():
                if module.weight.grad is not None:
                    names.append(name)
                    weights.append(module.weight.detach())
                    grads.append(module.weight.grad)
            if names and self.check_finite_gradients and not _all_finite(grads):
                names = []  # the scaler will skip this step: inf/NaN must not enter the scores
            if names:
                self.method.on_gradients(names, weights, grads)
        self._multiply_by_keep(lambda module: module.weight.grad)
        if self.units is not None:
            self.units.accumulate()
            self.units.mask_gradients()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.method.after_optimizer_step()
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.finished:
            return  # structures were removed: shapes changed and the zeros are final
        self._multiply_by_keep(lambda module: module.weight)
        if self.units is not None:
            self.units.apply_masks()

    def _multiply_by_keep(self, tensor_of) -> None:
        targets, keeps = [], []
        for name, keep in self._keep.items():
            tensor = tensor_of(self.modules[name])
            if tensor is not None:
                targets.append(tensor.data if isinstance(tensor, nn.Parameter) else tensor)
                keeps.append(keep if keep.dtype == tensor.dtype else keep.to(tensor.dtype))
        if not targets:
            return
        if same_dtype(targets, keeps):
            torch._foreach_mul_(targets, keeps)
        else:
            for tensor, keep in zip(targets, keeps):
                tensor.mul_(keep)

    def skip_step(self) -> None:
        """The optimizer skipped this step (fp16 GradScaler overflow): the schedule does not advance, no masks change."""
        self.skipped_steps += 1
        self._skip_next_update = True

    def update(self, step: int) -> bool:
        """Recompute masks if `step` is a scheduled pruning step; returns whether it was.

        `step` counts optimizer steps taken, skipped ones included (Trainer's global_step); the schedule follows the
        steps actually applied.
        """
        if self.schedule is None:
            raise RuntimeError("Pruner.start(total_steps) must be called before update().")
        if self._skip_next_update:
            self._skip_next_update = False
            return False
        step -= self.skipped_steps
        if self.method.fixed_masks or not self.schedule.is_update_step(step):
            return False
        if self.config.target_sparsity > 0 or self.config.sparsity_overrides:
            self.prune_to(self.schedule.sparsity_at(step))
        if self.units is not None:
            self.units.prune_to(
                self.schedule.sparsity_at(step, self.config.head_sparsity),
                self.schedule.sparsity_at(step, self.config.neuron_sparsity),
            )
            self.units.clear_optimizer_state(self.optimizer)
        self.last_update_step = step
        return True

    def finish(self) -> Optional[dict]:
        """End of training: masks applied a last time, masked heads/neurons removed physically if configured.

        Returns what was removed ({"heads": ..., "neurons": ...}) or None.
        """
        self.apply_masks()
        for hook in self._input_hooks:
            hook.remove()
        self._input_hooks = []
        if self.units is None or not self.config.remove_structures or self.finished:
            return None
        removed = self.units.remove()
        self.finished = True
        return removed

    # -------------------------------------------------------------------------------------------------- masks
    def set_masks(self, masks: dict[str, Optional[torch.Tensor]]) -> None:
        """Replace the masks of the named modules (True = pruned, the weight's stored shape) and apply them."""
        unknown = sorted(set(masks) - set(self.modules))
        if unknown:
            raise ValueError(f"Pruning masks name modules this model does not target: {unknown[:4]}")
        for name, mask in masks.items():
            weight = self.modules[name].weight
            if mask is None:
                self.masks[name] = None
                self._keep.pop(name, None)
                continue
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(
                    f"Pruning mask of {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}."
                )
            mask = mask.to(device=full(weight).device if not is_sharded(weight) else mask.device, dtype=torch.bool)
            self.masks[name] = mask  # whole, the same on every process (FSDP2 too)
            # The multiplier is cut like the weight (FSDP2: each process its shard).
            self._keep[name] = shard_like((~mask).to(weight.dtype), weight)
        self.apply_masks()

    def importance(self, name: str) -> torch.Tensor:
        """(out, in) float32 scores of one module under the configured method; higher is kept."""
        module = self.modules[name]
        # Ranked on the whole tensor: under FSDP2 each process gathers the scores (every rank prunes at the same step).
        return matrix_view(module, full(self.method.scores(name, module)))

    def _ranking_scores(self, name: str) -> torch.Tensor:
        # Pruning is monotone: a pruned weight is already zero, and letting it back in would restart it from zero
        # while the report counted it as pruned. Ranking it below everything keeps it pruned.
        scores = self.importance(name)
        mask = self.masks[name]
        if mask is not None:
            scores = torch.where(matrix_view(self.modules[name], mask), float("-inf"), scores)
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
        new_masks = {}
        for key, names in groups.items():
            target = sparsity
            if key.startswith("override:"):
                final = self.override_of[names[0]]
                # Same progress along the schedule as the global target, towards the module's own target.
                target = final * (sparsity / schedule_target) if schedule_target > 0 else final
            units = [unit_scores(self._ranking_scores(n), self.config) for n in names]
            for name, pruned_units in zip(names, select_lowest(units, target)):
                module = self.modules[name]
                mask = expand_units(pruned_units, matrix_view(module).shape, self.config)
                new_masks[name] = stored_layout(module, mask)
        self.scheduled_sparsity = sparsity
        for name, mask in new_masks.items():
            # Before set_masks zeroes them: the criterion sees the newly pruned weights' values (OBS compensates).
            previous = self.masks[name]
            self.method.on_masks_updated(name, self.modules[name], mask if previous is None else mask & ~previous)
        self.set_masks(new_masks)
        names = list(self._keep)
        keep_optimizer_state(self.optimizer, [self.modules[n].weight for n in names], [self._keep[n] for n in names])

    def attach_optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Let mask updates clear the optimizer state (e.g. Adam moments) of newly pruned weights."""
        self.optimizer = optimizer

    # -------------------------------------------------------------------------------- criterion-specific terms
    def score_parameters(self) -> list[nn.Parameter]:
        """Learnable parameters of the criterion (soft movement's scores), for the optimizer."""
        return self.method.parameters()

    def loss(self) -> Optional[torch.Tensor]:
        """The criterion's term for the training loss (soft movement's weighted regulariser), or None."""
        return self.method.loss()

    def regularization(self) -> torch.Tensor:
        """Soft movement's unweighted mean sigmoid of the scores (kept for existing callers)."""
        if not hasattr(self.method, "regularization"):
            raise AttributeError(f"The {self.config.method!r} method has no regulariser.")
        return self.method.regularization()

    # ----------------------------------------------------------------------------------------------- reporting
    @property
    def num_targeted(self) -> int:
        return sum(m.weight.numel() for m in self.modules.values())

    @torch.no_grad()
    def measured_sparsity(self) -> float:
        """Fraction of targeted weights that are exactly zero, counted on the weights (not on the masks)."""
        if self.finished:  # modules were rebuilt by structural removal
            return config_sparsity_report(self.model, self.config)["global_sparsity"]
        zeros = sum(int((full(m.weight.detach()) == 0).sum()) for m in self.modules.values())
        return zeros / self.num_targeted

    def log_metrics(self) -> dict[str, float]:
        metrics = {
            "sparsity": round(self.measured_sparsity(), 6),
            "scheduled_sparsity": round(self.scheduled_sparsity, 6),
        }
        if self.units is not None:
            metrics.update({k: round(v, 6) for k, v in self.units.log_metrics().items()})
        return metrics

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": STATE_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "masks": {n: m for n, m in self.masks.items() if m is not None},
            "method": self.method.state_dict(),
            "last_update_step": self.last_update_step,
            "skipped_steps": self.skipped_steps,
            "scheduled_sparsity": self.scheduled_sparsity,
            "structured": None if self.units is None else self.units.state_dict(),
        }

    def check_resume_config(self, saved: Optional[dict[str, Any]], source: str) -> None:
        """Refuse to continue a pruning state made under other mask-shaping settings, unless the config allows it."""
        if not isinstance(saved, dict) or self.config.allow_resume_changes:
            return
        current = self.config.to_dict()
        fields = RESUME_SENSITIVE_FIELDS + METHOD_RESUME_FIELDS.get(self.config.method, ())
        changed = [(key, saved[key], current[key]) for key in fields
                   if key in saved and _normalized(saved[key]) != _normalized(current[key])]
        if changed:
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed)
            raise ValueError(
                f"hf_prune: {source} was pruned with other settings ({listed}). Continuing its masks under this "
                "config would end at a sparsity and pattern neither describes. Resume with the checkpoint's settings "
                f"(its pruning_config.json), or set PruningConfig(allow_resume_changes=True) to keep its masks and "
                "scores and let this config's schedule take over from the next pruning step."
            )

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], source: str = "the pruning state") -> None:
        if not isinstance(state, dict):
            raise ValueError(f"hf_prune: {source} is not a pruning state: Pruner.state_dict() writes a mapping, this "
                             f"holds a {type(state).__name__}.")
        missing = [key for key in ("masks", "last_update_step", "scheduled_sparsity") if key not in state]
        if missing or not isinstance(state["masks"], dict):
            problem = f"it lacks {missing}" if missing else f"its 'masks' is a {type(state['masks']).__name__}"
            raise ValueError(f"hf_prune: {source} is not a pruning state as Pruner.state_dict() writes it ({problem}); "
                             "resume from a checkpoint that hf_prune saved.")
        self.check_resume_config(state.get("config"), source)
        version = state.get("format_version", 1)
        if isinstance(version, int) and version > STATE_FORMAT_VERSION:
            known = {"format_version", "config", "masks", "method", "scores", "last_update_step",
                     "scheduled_sparsity", "structured", "skipped_steps"}
            logger.warning(
                "hf_prune: this pruning state was written by a newer hf_prune (format_version %s, this one reads %s); "
                "ignoring what it does not know: %s.", version, STATE_FORMAT_VERSION, sorted(set(state) - known),
            )
        unknown = set(state["masks"]) - set(self.modules)
        if unknown:
            raise ValueError(
                f"hf_prune: {source} holds masks for modules this model does not target: {sorted(unknown)[:4]} "
                f"(it targets, for example, {list(self.modules)[:4]}); the state belongs to another model or other "
                "PruningConfig.targets."
            )
        try:
            self.set_masks({name: state["masks"].get(name) for name in self.modules})
            # Version 1 kept the movement / soft-movement scores at the top level.
            method_state = state["method"] if "method" in state else {"scores": state.get("scores", {})}
            self.method.load_state_dict(method_state)
            if self.units is not None and state.get("structured") is not None:
                self.units.load_state_dict(state["structured"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError) as err:
            # The criterion's and the unit pruner's own loaders index the state directly: any of these means the
            # state was written for another model, or damaged.
            raise ValueError(f"hf_prune: {source} does not fit this model ({type(err).__name__}: {err}).") from None
        self.last_update_step = state["last_update_step"]
        self.scheduled_sparsity = state["scheduled_sparsity"]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.apply_masks()

    def save(self, directory: str) -> str:
        # Atomic: never leave a half-written state beside a good checkpoint.
        return atomic_torch_save(self.state_dict(), os.path.join(directory, STATE_NAME))

    def load(self, directory: str) -> None:
        path = os.path.join(directory, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hf_prune: no {STATE_NAME} in {directory!r}; give a checkpoint folder that "
                                    "hf_prune saved (Pruner.save, or a Trainer checkpoint of a pruning run).")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only loading refuses pickled objects; its own message suggests turning that off, which would
            # run whatever code the file holds. A state hf_prune wrote holds only tensors and plain containers.
            raise ValueError(f"hf_prune: {path} holds objects other than tensors and plain containers, so it was not "
                             "written by hf_prune's Pruner.save and is not loaded; resume from a checkpoint that "
                             "hf_prune saved.") from None
        except Exception as err:  # a truncated zip, or no torch file at all (torch raises RuntimeError, KeyError, ...)
            reason = str(err).split(". ")[0]
            raise ValueError(f"hf_prune: {path} could not be read ({type(err).__name__}: {reason}); it is truncated "
                             "or was not written by hf_prune's Pruner.save. Resume from a checkpoint whose pruning "
                             "state is intact.") from None
        self.load_state_dict(state, source=f"the checkpoint {directory} ({STATE_NAME})")


def _search(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def _example_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_prunable_module(m)][:6]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    # One fused norm per tensor and a single host sync; a norm is finite exactly when every element is.
    return bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)])).all())


def _one_module_per_weight(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Targeted modules with tied weights (one Parameter in several modules) are pruned once, through the first.

    Ranking the shared tensor twice would count it twice towards the sparsity and prune it under two masks; the
    tied copies (an LM head and its embedding, say) see the one mask because they are the same tensor.
    """
    seen: dict[int, str] = {}
    kept = {}
    for name, module in modules.items():
        owner = seen.setdefault(id(module.weight), name)
        if owner == name:
            kept[name] = module
        else:
            logger.info("hf_prune: %s shares its weight with %s; pruned once, through %s", name, owner, owner)
    return kept


def weights_sharded_since(pruner: "Pruner") -> bool:
    """Whether `pruner`'s weights became DTensors after it was built (its masks and scores are then of the wrong kind)."""
    return not pruner.sharded and any(is_sharded(m.weight) for m in pruner.modules.values())
