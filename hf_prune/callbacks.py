"""TrainerCallbacks that prune during fine-tuning: add one to any existing `Trainer` through `callbacks=[...]`.

They are thin: every decision is the `Pruner`'s. `PruningTrainer` uses the same callbacks internally, so a script that
adds a callback and one that switches to `PruningTrainer` get the same masks for the same seed and config.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler
from transformers.utils import logging

from .config import PruningConfig
from .finalize import carry_artifacts
from .methods import get_method
from .pruner import STATE_NAME, Pruner, weights_sharded_since
from .sharding import check_unsharded

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint"


class PruningCallback(TrainerCallback):
    """Gradual pruning as a `TrainerCallback`, for any registered method (`hf_prune.available_methods()`).

    Args:
        config: a `PruningConfig`.
        managed_by_trainer: set by `PruningTrainer`, which wires in what a callback cannot (loss terms, learnable
            scores); methods that need those (`requires_trainer`, e.g. soft_movement) are refused otherwise.
    """

    #: Methods a subclass accepts; None accepts every registered method.
    methods: Optional[tuple[str, ...]] = None

    def __init__(self, config: PruningConfig, *, managed_by_trainer: bool = False) -> None:
        if not isinstance(config, PruningConfig):
            raise TypeError(f"{type(self).__name__} takes a PruningConfig, got {type(config).__name__}.")
        if self.methods is not None and config.method not in self.methods:
            raise ValueError(
                f"{type(self).__name__} got PruningConfig.method={config.method!r}; it supports {self.methods}. "
                "hf_prune.PruningCallback takes any registered method."
            )
        if get_method(config.method).requires_trainer and not managed_by_trainer:
            raise ValueError(
                f"PruningConfig.method={config.method!r} adds a loss term or learnable scores, which a TrainerCallback "
                "cannot wire into a plain Trainer. Use hf_prune.PruningTrainer(pruning_config=...) for it, or a "
                "method without that need (e.g. 'magnitude' or 'movement') with the callback."
            )
        self.config = config
        self.pruner: Optional[Pruner] = None
        self._loss_scale: Optional[float] = None  # the fp16 GradScaler's scale before the current step
        self.resume_from: Optional[str] = None  # set by PruningTrainer.train(resume_from_checkpoint=...)
        self.metrics_logged_by_trainer = managed_by_trainer

    def build(self, model) -> Pruner:
        if self.pruner is None or self.pruner.model is not model or weights_sharded_since(self.pruner):
            self.pruner = Pruner(model, self.config)
            # Every save of this model (save_model, checkpoints, push_to_hub) then carries the pruning artifacts, and
            # a checkpoint its pruning state, written with the weights, before Trainer rotates old checkpoints away.
            carry_artifacts(model, self.config, self.pruner)
        return self.pruner

    # Building at the end of Trainer.__init__ makes bad targets or patterns fail before training starts.
    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_unsharded(args=args)  # FSDP / ZeRO-3 wrap the model only in train(): refuse them here, early
        if model is not None:
            self.build(model)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, optimizer=None, **kw
    ):
        pruner = self.build(model)
        # Only a loss scaler skips steps (fp16; accelerate puts it on the optimizer it wraps): check then, and only then,
        # since the check costs a pass over the gradients.
        pruner.check_finite_gradients = bool(getattr(args, "fp16", False)) or getattr(optimizer, "scaler", None) is not None
        pruner.start(state.max_steps)
        pruner.attach_optimizer(optimizer)
        if state.global_step > 0:
            self._restore(args, state, pruner)
        self._log_before_reporters()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._loss_scale = _loss_scale(optimizer)
        self.pruner.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if _step_was_skipped(optimizer, self._loss_scale):
            self.pruner.skip_step()
        self.pruner.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner.update(state.global_step):
            logger.debug("hf_prune: step %d, sparsity %.4f", state.global_step, self.pruner.scheduled_sparsity)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.metrics_logged_by_trainer or self.pruner is None:
            return
        metrics = self.pruner.log_metrics()
        logs.update(metrics)
        # Trainer copied `logs` into the history before calling callbacks.
        if state.log_history:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, model=None, **kwargs):
        # The checkpoint's save_pretrained wrote the state already (carry_artifacts); this covers models without
        # save_pretrained.
        directory = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(directory) \
                and not os.path.isfile(os.path.join(directory, STATE_NAME)):
            self.pruner.save(directory)

    def on_train_end(self, args, state, control, **kwargs):
        removed = self.pruner.finish()
        if removed:
            logger.info("hf_prune: removed heads %s and FFN neurons of %d layers", removed["heads"], len(removed["neurons"]))

    def _restore(self, args, state, pruner: Pruner) -> None:
        candidates = [
            self.resume_from,
            _resume_path_given_to_trainer(),
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}"),
        ]
        for directory in candidates:
            if directory and os.path.isfile(os.path.join(directory, STATE_NAME)):
                pruner.load(directory)
                logger.info("hf_prune: restored pruning state of step %d from %s", state.global_step, directory)
                return
        searched = list(dict.fromkeys(c for c in candidates if c))
        if pruner.method.state_dict() and not self.config.allow_resume_changes:
            # Movement-type scores live only in the state file: without it the run would end with other masks.
            raise ValueError(
                f"hf_prune: resuming at step {state.global_step} with method {self.config.method!r}, but no "
                f"{STATE_NAME} was found in {searched}: its scores would restart from zero and the run would end "
                "with masks an uninterrupted run would not have. Resume from a checkpoint that hf_prune saved, or set "
                "PruningConfig(allow_resume_changes=True) to rebuild the masks from the zeros in the weights and "
                "restart the scores."
            )
        # Without the state file, the zeros saved in the weights are the masks (exact for magnitude pruning).
        logger.warning(
            "hf_prune: resuming at step %d but no %s found in %s; rebuilding masks from the zeros in the weights.",
            state.global_step,
            STATE_NAME,
            searched,
        )
        masks = {}
        for name, module in pruner.modules.items():
            zeros = module.weight.detach() == 0
            masks[name] = zeros if bool(zeros.any()) else None
        pruner.set_masks(masks)
        pruner.scheduled_sparsity = pruner.schedule.sparsity_at(state.global_step)

    def _log_before_reporters(self) -> None:
        # Reporting callbacks (TensorBoard, W&B, ...) are registered before user callbacks, and `on_log` runs in
        # list order, so sparsity added in our `on_log` would reach them one event late. Moving this callback to the
        # front of the handler's list makes it write the metrics first. The handler is the caller of this event.
        handler = sys._getframe(2).f_locals.get("self")
        if isinstance(handler, CallbackHandler) and self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)


class MagnitudePruningCallback(PruningCallback):
    """Gradual magnitude pruning (Zhu & Gupta 2017): `PruningConfig(method="magnitude", ...)`."""

    methods = ("magnitude",)

    def __init__(self, config: Optional[PruningConfig] = None) -> None:
        super().__init__(config if config is not None else PruningConfig(method="magnitude"))


class MovementPruningCallback(PruningCallback):
    """Hard movement pruning (Sanh et al. 2020): `PruningConfig(method="movement", ...)`."""

    methods = ("movement",)

    def __init__(self, config: Optional[PruningConfig] = None) -> None:
        super().__init__(config if config is not None else PruningConfig(method="movement"))


class ConstantPruningCallback(PruningCallback):
    """Keep the zeros the model has (from `hf_prune.oneshot`, or an earlier run) while fine-tuning: nothing new is
    pruned and nothing pruned comes back. `PruningConfig(method="constant")`."""

    methods = ("constant",)

    def __init__(self, config: Optional[PruningConfig] = None) -> None:
        super().__init__(config if config is not None else PruningConfig(method="constant"))


class HeadPruningCallback(PruningCallback):
    """Attention-head (and optionally FFN-neuron) pruning during fine-tuning, removed physically at the end.

    Default: half of all heads, no unstructured sparsity: `PruningConfig(target_sparsity=0.0, head_sparsity=0.5)`.
    Set `neuron_sparsity` to shrink the FFNs too.
    """

    def __init__(self, config: Optional[PruningConfig] = None) -> None:
        config = config if config is not None else PruningConfig(target_sparsity=0.0, head_sparsity=0.5)
        if config.head_sparsity == 0 and config.neuron_sparsity == 0:
            raise ValueError(
                "HeadPruningCallback got PruningConfig.head_sparsity=0 and neuron_sparsity=0: set at least one to a "
                "fraction in (0, 1), or use MagnitudePruningCallback for unstructured pruning only."
            )
        super().__init__(config)


def _resume_path_given_to_trainer() -> Optional[str]:
    """The checkpoint `Trainer.train(resume_from_checkpoint=...)` is resuming from, or None.

    Trainer hands callbacks neither that path nor its own state file, and `TrainingArguments.resume_from_checkpoint`
    holds only what the user put there, so a checkpoint outside `output_dir` would otherwise go unseen. Trainer's
    training loop (`_inner_training_loop`, the caller of `on_train_begin` in Transformers 4.x and 5.x) has the
    resolved path as its argument; it is read from that frame.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and isinstance(frame.f_locals.get("self"), Trainer):
            path = frame.f_locals.get("resume_from_checkpoint")
            return path if isinstance(path, str) else None
        frame = frame.f_back
    return None


def _loss_scale(optimizer) -> Optional[float]:
    """The GradScaler's scale before this step, where accelerate's optimizer carries one (fp16), else None."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler.get_scale() if scaler is not None else None


def _step_was_skipped(optimizer, scale_before: Optional[float]) -> bool:
    """Whether the loss scaler skipped this optimizer step (inf/NaN gradients).

    accelerate's `step_was_skipped` sees a skip only when the scaler does not call `optimizer.step()`; a fused
    optimizer (Transformers' default `adamw_torch_fused`) is always called and skips inside, so accelerate reports
    False. The scaler's own sign of an overflow is exact for both: it lowers the scale only after one.
    """
    if getattr(optimizer, "step_was_skipped", False):
        return True
    return scale_before is not None and _loss_scale(optimizer) < scale_before

