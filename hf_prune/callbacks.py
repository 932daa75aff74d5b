"""TrainerCallbacks that prune during fine-tuning: add one to any existing `Trainer` through `callbacks=[...]`, then
`callback.attach(trainer)` so that reporters (TensorBoard, W&B) receive the sparsity metrics.

They are thin: every decision is the `Pruner`'s. `PruningTrainer` uses the same callbacks internally, so a script that
adds a callback and one that switches to `PruningTrainer` get the same masks for the same seed and config.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import logging

from .config import PruningConfig
from .finalize import carry_artifacts
from .methods import get_method
from .pruner import STATE_NAME, Pruner, weights_sharded_since
from .sharding import check_unsharded

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint"

# The learning-rate hint (see `_warn_about_learning_rate`): from this target sparsity on, and below this rate, an
# encoder fine-tuned with the two lines stays well short of the dense model. Measured at 90% unstructured on the
# packaged MiniLM, 250 steps, three seeds (benchmarks/results/sparsity_seeds.md): lr 1e-4 kept 83% of dense accuracy
# (local scope, the default; global 76% on one seed); lr 1e-3 with scope="global" 92.5%.
HIGH_SPARSITY = 0.8
SMALL_LEARNING_RATE = 5e-4
SUGGESTED_LEARNING_RATE = 1e-3


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
        # The checkpoint folder a resumed run continues from: set by PruningTrainer.train(resume_from_checkpoint=...);
        # with a plain Trainer, set it (or TrainingArguments.resume_from_checkpoint) for a folder outside output_dir.
        self.resume_from: Optional[str] = None
        self.metrics_logged_by_trainer = managed_by_trainer
        self._first_in_handler = False  # set by attach()
        self._warned_about_reporters = False

    def attach(self, trainer):
        """Put this callback first among `trainer`'s callbacks (adding it if it is not there yet); returns `trainer`.

        With a plain `Trainer`, call it once after building the trainer. Trainer places its reporting callbacks
        (TensorBoard, W&B, ...) before the callbacks it is given and calls `on_log` in list order, so the sparsity
        metrics this callback adds to each log event would otherwise land in `state.log_history` but never reach the
        reporters. Trainer offers a callback no handle on that list, so the trainer has to be handed over.
        `PruningTrainer` does this for its own callback (and adds the metrics in `log` anyway).
        """
        from .trainer import PruningTrainer  # here: trainer.py imports this module

        if isinstance(trainer, PruningTrainer) and trainer.pruning_callback is not self:
            raise ValueError("PruningTrainer adds its own pruning callback; attach hf_prune callbacks to a plain "
                             "Trainer.")
        if trainer.pop_callback(self) is None:
            # Not given to the trainer's constructor: catch up on the event it missed (early checks, the Pruner).
            self.on_init_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
        trainer.callback_handler.callbacks.insert(0, self)
        self._first_in_handler = True
        return trainer

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
        self._warn_if_reporters_come_first(args)
        if state.is_world_process_zero:
            self._warn_about_learning_rate(args, model)

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
        # Trainer tells a callback neither the folder train(resume_from_checkpoint=...) resumed from nor anything that
        # leads to it, so the pruning state is looked for where the supported interfaces point: the folder
        # PruningTrainer.train recorded (or the user set on the callback), TrainingArguments.resume_from_checkpoint
        # (where scripts put the path they give train()), and output_dir/checkpoint-<step> (what
        # train(resume_from_checkpoint=True) picks). The last two are guesses, taken only when the folder's
        # trainer_state.json is the state Trainer restored: a same-step checkpoint of another run in output_dir must
        # not lend this run its masks and scores. Trainer's stateful callbacks (ExportableState) do not carry the
        # state instead: they keep JSON in trainer_state.json (no tensors, no folder that survives a move), and with
        # restore_callback_states_from_checkpoint Trainer would replace this callback by a new instance.
        told = [self.resume_from]
        guessed = [
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}"),
        ]
        other_runs = []
        for directory in told + guessed:
            if not directory or not os.path.isfile(os.path.join(directory, STATE_NAME)):
                continue
            if directory not in told and not _holds_trainer_state(directory, state):
                other_runs.append(directory)
                continue
            pruner.load(directory)
            logger.info("hf_prune: restored pruning state of step %d from %s", state.global_step, directory)
            return
        searched = list(dict.fromkeys(c for c in told + guessed if c))
        not_this_run = (
            f" ({other_runs} hold one, but their {TRAINER_STATE_NAME} is not the state Trainer resumed: another run "
            "or step)" if other_runs else ""
        )
        how_to_point = (
            "A plain Trainer does not tell its callbacks the folder given to train(resume_from_checkpoint=...): for "
            f"a folder other than output_dir/{CHECKPOINT_PREFIX}-<step>, set "
            "TrainingArguments(resume_from_checkpoint=...) to it as well, or use PruningTrainer."
        )
        if pruner.method.state_dict() and not self.config.allow_resume_changes:
            # Movement-type scores live only in the state file: without it the run would end with other masks.
            raise ValueError(
                f"hf_prune: resuming at step {state.global_step} with method {self.config.method!r}, but no "
                f"{STATE_NAME} was found in {searched}{not_this_run}: its scores would restart from zero and the run "
                "would end with masks an uninterrupted run would not have. Resume from a checkpoint that hf_prune "
                "saved, or set PruningConfig(allow_resume_changes=True) to rebuild the masks from the zeros in the "
                f"weights and restart the scores. {how_to_point}"
            )
        # Without the state file, the zeros saved in the weights are the masks (exact for magnitude pruning).
        logger.warning(
            "hf_prune: resuming at step %d but no %s found in %s%s; rebuilding masks from the zeros in the weights. %s",
            state.global_step,
            STATE_NAME,
            searched,
            not_this_run,
            how_to_point,
        )
        masks = {}
        for name, module in pruner.modules.items():
            zeros = module.weight.detach() == 0
            masks[name] = zeros if bool(zeros.any()) else None
        pruner.set_masks(masks)
        pruner.scheduled_sparsity = pruner.schedule.sparsity_at(state.global_step)

    def _warn_about_learning_rate(self, args, model) -> None:
        # A callback cannot change the user's learning rate, and at high sparsity the rate of dense fine-tuning is
        # what most holds an encoder back: say so once, with the number measured. Generative models (causal LMs,
        # seq2seq) are fine-tuned at rates where 10x would diverge: no hint for them.
        # The second-order criterion compensates the pruned weights itself and held 90% at the dense rate: no hint.
        config = self.config
        can_generate = getattr(model, "can_generate", None)
        if (config.target_sparsity < HIGH_SPARSITY or config.schedule == "one_shot" or config.method == "obs"
                or args.learning_rate >= SMALL_LEARNING_RATE or (callable(can_generate) and can_generate())):
            return
        logger.warning(
            "hf_prune: pruning to %.0f%% of the weights with learning_rate=%g. Weights pruned this far are won back "
            "by larger steps than dense fine-tuning takes: on the packaged MiniLM at 90%% (README, 'What the two "
            "lines reach'), learning_rate=%g kept 83%% of the dense accuracy and learning_rate=%g with "
            "PruningConfig(scope='global') 92%%. For an encoder of that size try TrainingArguments(learning_rate="
            "%g) together with PruningConfig(scope='global') (the rate alone, ranking layer by layer, kept 76%% on "
            "one seed), or keep the rate and rank by the second-order criterion, PruningCallback(PruningConfig("
            "method='obs', ...)), which kept 90%% at learning_rate=%g (it holds the last 16 gradients of the "
            "pruned weights in memory)%s.",
            100 * config.target_sparsity, args.learning_rate, 1e-4, SUGGESTED_LEARNING_RATE,
            SUGGESTED_LEARNING_RATE, 1e-4,
            "" if self.metrics_logged_by_trainer else
            "; hf_prune.PruningTrainer with the dense model as teacher kept 94% (magnitude), 96% (method='obs', "
            "configs/obs.yaml) and 97% (configs/default.yaml: obs ranking all layers from 64 gradients)",
        )

    def _warn_if_reporters_come_first(self, args) -> None:
        # See attach(): without it, a plain Trainer's reporters have logged each event before on_log adds sparsity.
        # Only report_to's reporters are known to come first, so only they are warned about.
        if self.metrics_logged_by_trainer or self._first_in_handler or self._warned_about_reporters:
            return
        reporters = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if reporters:
            self._warned_about_reporters = True
            logger.warning(
                "hf_prune: %s runs after the reporting callbacks %s, so they will not receive the sparsity metrics "
                "it logs (trainer.state.log_history has them). Call attach(trainer) on the callback after building "
                "the Trainer, or use hf_prune.PruningTrainer.",
                type(self).__name__,
                reporters,
            )


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


def _holds_trainer_state(directory: str, state: TrainerState) -> bool:
    """Whether `directory` is the checkpoint whose `trainer_state.json` Trainer restored as `state` (or a copy of it).

    Its step and log history (losses, learning rates, sparsity: particular to a run) must be the restored ones;
    compared as JSON, so that NaN losses compare equal.
    """
    try:
        with open(os.path.join(directory, TRAINER_STATE_NAME), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return saved.get("global_step") == state.global_step and json.dumps(
        saved.get("log_history"), sort_keys=True
    ) == json.dumps(state.log_history, sort_keys=True)


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

