"""`PruningTrainer`: a drop-in `transformers.Trainer` that prunes while it fine-tunes.

It adds the pruning callback for `pruning_config.method` (the same one a plain `Trainer` can take), and overrides
only what a callback cannot reach: the loss (distillation from a dense teacher, the soft-movement regulariser), the
optimizer (learned soft-movement scores), the logs (sparsity beside the loss for every reporter) and saving
(`pruning_config.json`, sparsity report, model card).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import logging

from .callbacks import PruningCallback
from .config import PruningConfig
from .files import last_complete_checkpoint
from .finalize import model_card_section, pruned_structure, write_model_card_section
from .masks import config_sparsity_report
from .plot import plot_training
from .pruner import Pruner

logger = logging.get_logger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al. 2015).

    Logits of any rank are flattened to (positions, classes), so sequence classification and token-level heads
    share the same code.
    """
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, classes).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def hidden_state_loss(
    student: tuple[torch.Tensor, ...],
    teacher: tuple[torch.Tensor, ...],
    layers: Optional[list[int]] = None,
    channels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over layers of the MSE between student and teacher hidden states, layer to layer.

    Args:
        student, teacher: `output_hidden_states` of each (the embeddings first, then one per layer).
        layers: for a depth-pruned student, the teacher state each student state is compared with (see
            `hidden_state_alignment`); default: the same position.
        channels: for a width-pruned student, the teacher channels it kept (original indices); default: all.
    """
    layers = list(range(len(student))) if layers is None else layers
    if len(layers) != len(student) or max(layers) >= len(teacher):
        raise ValueError(
            f"PruningConfig.distillation_hidden_weight needs a teacher with as many layers as the student had before "
            f"pruning ({len(teacher) - 1} in the teacher, {len(student) - 1} in the student); set it to 0 for "
            "teachers of another depth."
        )
    losses = []
    for position in range(1, len(student)):
        target = teacher[layers[position]]
        if channels is not None:
            target = target.index_select(-1, channels.to(target.device))
        losses.append(F.mse_loss(student[position].float(), target.float()))
    return torch.stack(losses).mean()


def _output_vocabulary(model: nn.Module) -> Optional[int]:
    """The vocabulary a language model's logits range over (its output embeddings), or None for other heads."""
    get = getattr(model, "get_output_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _input_vocabulary(model: nn.Module) -> Optional[int]:
    """How many token ids the model's input embeddings can look up, or None when it has none (audio, vision)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except NotImplementedError:
        return None
    count = getattr(embeddings, "num_embeddings", None)
    return int(count) if count is not None else None


def _output_space(model: nn.Module) -> tuple[str, Optional[int]]:
    """What the model's logits range over: ("vocabulary", tokens) for a language-model head, ("labels", classes) for
    a classification head, ("unknown", None) otherwise."""
    vocabulary = _output_vocabulary(model)
    if vocabulary is not None:
        return "vocabulary", vocabulary
    if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification",
                                      "ForImageClassification", "ForAudioClassification", "ForMultipleChoice")):
        return "labels", getattr(getattr(model, "config", None), "num_labels", None)
    return "unknown", None


def check_teacher(student: nn.Module, teacher: nn.Module, tokenizer: Any = None) -> None:
    """Refuse, before the first step, a teacher that cannot read the student's inputs or predicts something else.

    What the teacher reads: every token id the student's tokenizer (else its input embeddings) can produce must be
    inside the teacher's input embeddings -- otherwise the teacher's forward dies with an index error mid-step. What
    it predicts: the same kind of output (vocabulary or labels) and the same size, compared position by position.
    """
    student_kind, student_size = _output_space(student)
    teacher_kind, teacher_size = _output_space(teacher)
    if "unknown" not in (student_kind, teacher_kind) and student_kind != teacher_kind:
        raise ValueError(f"teacher_model predicts {teacher_kind} ({teacher_size}) but the model predicts "
                         f"{student_kind} ({student_size}): distillation compares the same outputs; give a teacher "
                         f"with the model's head ({type(student).__name__}).")
    if student_kind == teacher_kind == "labels" and None not in (student_size, teacher_size) \
            and student_size != teacher_size:
        raise ValueError(f"teacher_model has num_labels={teacher_size} but the model has {student_size}; distillation "
                         "needs the same output space.")
    if student_kind == teacher_kind == "vocabulary" and student_size != teacher_size:
        raise ValueError(f"teacher_model predicts a vocabulary of {teacher_size} tokens but the model {student_size}; "
                         "distillation compares the two distributions token by token, so they need the same "
                         "tokenizer.")
    readable = _input_vocabulary(teacher)
    produced = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else \
        _input_vocabulary(student)
    if readable is not None and produced is not None and readable < produced:
        source = "the tokenizer" if tokenizer is not None and hasattr(tokenizer, "__len__") else "the model's inputs"
        raise ValueError(f"teacher_model reads token ids below {readable} but {source} produces ids up to "
                         f"{produced - 1}: the teacher would fail on the first such token. Distil from a teacher "
                         "with the student's tokenizer (the dense model it was pruned from).")


def hidden_state_alignment(student: nn.Module, teacher_width: int,
                           teacher_depth: Optional[int] = None) -> tuple[list[int], Optional[torch.Tensor]]:
    """Which teacher hidden state and channels each hidden state of a depth- or width-pruned student matches.

    The teacher is the student before pruning (its original depth and width): hidden state 0 is the embeddings,
    state k the output of original layer k - 1.
    """
    from .structure import structure_summary

    summary = structure_summary(student)
    if summary["original_hidden_size"] != teacher_width:
        raise ValueError(
            f"PruningConfig.distillation_hidden_weight needs a teacher of the student's original hidden size "
            f"({summary['original_hidden_size']}), got {teacher_width}; set it to 0 for teachers of another width."
        )
    if teacher_depth is not None and teacher_depth != summary["original_num_layers"]:
        raise ValueError(
            f"PruningConfig.distillation_hidden_weight needs a teacher with as many layers as the student had before "
            f"pruning ({teacher_depth} in the teacher, {summary['original_num_layers']} in the student); set it to 0 "
            "for teachers of another depth."
        )
    gone_layers = set(summary["pruned_layers"])
    layers = [0] + [k + 1 for k in range(summary["original_num_layers"]) if k not in gone_layers]
    gone = set(summary["pruned_hidden"])
    channels = torch.tensor([c for c in range(teacher_width) if c not in gone]) if gone else None
    return layers, channels


class PruningTrainer(Trainer):
    """`Trainer` that prunes `model` during training according to `pruning_config`.

    Args:
        model: the model to fine-tune and prune.
        args: the usual `TrainingArguments`.
        pruning_config: what, how much and when to prune; default `PruningConfig()` (cubic magnitude to 90%).
        teacher_model: optional dense model whose logits the student learns to match (KL with temperature,
            weighted by `pruning_config.distillation_alpha`); typically the fine-tuned dense model.
        plot_dir: optional folder; at the end of `train()` the main process writes `schedule.png` (sparsity over
            the steps, with the eval accuracy where logged) and `layer_sparsity.png` (per layer and module type)
            there (`hf_prune.plot.plot_training`). Without matplotlib it warns; the training result is unaffected.
        **kwargs: anything `Trainer` accepts (`train_dataset`, `compute_metrics`, `callbacks`, ...).
    """

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, None] = None,
        args=None,
        pruning_config: Optional[PruningConfig] = None,
        teacher_model: Optional[nn.Module] = None,
        plot_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        self.plot_dir = plot_dir
        self.pruning_config = pruning_config if pruning_config is not None else PruningConfig()
        if not isinstance(self.pruning_config, PruningConfig):
            raise TypeError(f"pruning_config must be a PruningConfig, got {type(self.pruning_config).__name__}.")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if any(isinstance(c, PruningCallback) or c is PruningCallback for c in callbacks):
            raise ValueError("PruningTrainer adds its own pruning callback; remove the hf_prune callback from `callbacks`.")
        self.pruning_callback = PruningCallback(self.pruning_config, managed_by_trainer=True)
        super().__init__(model=model, args=args, callbacks=callbacks + [self.pruning_callback], **kwargs)
        # First in the list, as a plain Trainer's callback is after attach(): its on_step_end and on_train_end (masks
        # updated, structures removed) run before those of other callbacks, which then see the pruned model.
        self.pruning_callback.attach(self)
        if self.pruning_callback.pruner is None and self.model is not None:
            self.pruning_callback.build(self.model)
        self.teacher_model = self._prepare_teacher(teacher_model)
        self._hidden_alignment: Optional[tuple[list[int], Optional[torch.Tensor]]] = None  # see compute_loss

    @property
    def pruner(self) -> Pruner:
        return self.pruning_callback.build(self.model)

    def _prepare_teacher(self, teacher: Optional[nn.Module]) -> Optional[nn.Module]:
        if teacher is None:
            return None
        check_teacher(self.model, teacher, getattr(self, "processing_class", None))
        # eval() for deterministic targets; requires_grad is left alone (the forward runs under no_grad), so the
        # caller's model stays trainable if it is reused.
        return teacher.to(self.args.device).eval()

    # ------------------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            # The newest checkpoint written to the end: a run killed while saving leaves a partial one, which
            # Trainer's own choice (the highest number) would fail to load.
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in output_dir "
                                 f"{self.args.output_dir!r} to resume from.")
        if isinstance(resume_from_checkpoint, str):
            self.pruning_callback.resume_from = resume_from_checkpoint
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.plot_dir is not None and self.is_world_process_zero():
            report = config_sparsity_report(self.model, self.pruning_config)
            plot_training(self.state.log_history, report, self.plot_dir)
        return result

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.pruning_config.rewarm_after_pruning and not getattr(scheduler, "hf_prune_rewarmed", False):
            self.lr_scheduler = scheduler = rewarmed(scheduler, self.pruning_config, num_training_steps,
                                                     self.args.lr_scheduler_type)
        return scheduler

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        scores = self.pruner.score_parameters()
        if scores:
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(p) in known for p in scores):
                # Scores want a far larger step than weights (Sanh et al. use 1e-2) and no weight decay.
                optimizer.add_param_group(
                    {"params": scores, "lr": self.pruning_config.score_learning_rate, "weight_decay": 0.0}
                )
        return optimizer

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        config = self.pruning_config
        distill = self.teacher_model is not None and model.training
        hidden = distill and config.distillation_hidden_weight > 0
        if hidden:
            inputs = {**inputs, "output_hidden_states": True}
        needs_outputs = return_outputs or distill
        result = super().compute_loss(model, inputs, return_outputs=needs_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if needs_outputs else (result, None)
        if distill:
            teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
            with torch.no_grad():
                teacher_outputs = self.teacher_model(**teacher_inputs)
            alpha = config.distillation_alpha
            kd = distillation_loss(outputs["logits"], teacher_outputs["logits"], config.distillation_temperature)
            loss = (1.0 - alpha) * loss + alpha * kd
            if hidden:
                student_states, teacher_states = outputs["hidden_states"], teacher_outputs["hidden_states"]
                layers = channels = None
                if len(student_states) != len(teacher_states) or student_states[-1].shape != teacher_states[-1].shape:
                    # A depth- or width-pruned student: compare with the teacher's matching layers and channels.
                    # Depth and width do not change while training, so the alignment is worked out once.
                    if self._hidden_alignment is None:
                        self._hidden_alignment = hidden_state_alignment(
                            self.accelerator.unwrap_model(model), teacher_states[-1].shape[-1], len(teacher_states) - 1
                        )
                    layers, channels = self._hidden_alignment
                loss = loss + config.distillation_hidden_weight * hidden_state_loss(
                    student_states, teacher_states, layers, channels
                )
        if model.training:
            term = self.pruner.loss()  # the criterion's own loss term (soft movement's regulariser), if any
            if term is not None:
                loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Added here rather than in the callback's on_log so every reporter (TensorBoard, W&B) receives them.
        if self.pruning_callback.pruner is not None:
            logs.update(self.pruner.log_metrics())
        super().log(logs, *args, **kwargs)

    # --------------------------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Standard checkpoint (zeros in place) plus `pruning_config.json`, `sparsity_report.json`, model card (written
        by the model's save_pretrained, see `hf_prune.finalize.carry_artifacts`)."""
        self.pruner.apply_masks()
        super().save_model(output_dir, _internal_call=_internal_call)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # Trainer's card replaces README.md (push_to_hub writes it after save_model): put our section back.
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            report = config_sparsity_report(self.model, self.pruning_config)
            section = model_card_section(self.pruning_config, report, pruned_structure(self.model))
            write_model_card_section(self.args.output_dir, section)


def rewarmed(scheduler: Any, config: PruningConfig, num_training_steps: int, kind: Any) -> Any:
    """`scheduler` until the last mask update of `config`'s schedule, then back at the peak learning rate and
    linearly down to 0 at `num_training_steps` (every parameter group alike)."""
    from torch.optim.lr_scheduler import LambdaLR

    from .schedules import SparsitySchedule

    if not isinstance(scheduler, LambdaLR):
        raise ValueError(f"PruningConfig.rewarm_after_pruning=True needs a learning-rate schedule given as factors "
                         f"of the peak (Transformers' linear, cosine, constant, polynomial, ...); lr_scheduler_type "
                         f"{kind!r} made a {type(scheduler).__name__}.")
    end = SparsitySchedule.from_config(config, num_training_steps).end_step
    after = max(num_training_steps - end, 1)

    def factor(before):
        # LambdaLR calls it with the number of optimizer steps taken: the masks were last updated after step `end`.
        return lambda step: before(step) if step < end else max(0.0, (num_training_steps - step) / after)

    combined = LambdaLR(scheduler.optimizer, [factor(f) for f in scheduler.lr_lambdas])
    combined.hf_prune_rewarmed = True
    return combined
