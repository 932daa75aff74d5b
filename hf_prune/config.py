"""`PruningConfig`: what to prune, how much, and when.

A plain dataclass so that `HfArgumentParser` turns it into command-line flags, and YAML/JSON files into configs.
Everything is validated in `__post_init__`, before a model or a Trainer exists, so bad input fails in seconds and
not after an hour of training.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Literal, Optional, Union, get_args

from transformers.utils import logging

from .files import atomic_write_text
from .methods import PruningMethod, available_methods, get_method

logger = logging.get_logger(__name__)

Schedule = Literal["cubic", "linear", "one_shot"]
Granularity = Literal["unstructured", "block", "n:m"]
Scope = Literal["global", "local"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
SCOPES: tuple[str, ...] = get_args(Scope)

# Version of the saved `pruning_config.json`; a file from a newer hf_prune loads with a warning, its unknown keys
# ignored.
FORMAT_VERSION = 1

# Linear layers inside numbered transformer blocks: `encoder.layer.3.`, `layers.3.`, `transformer.h.3.`, `blocks.3.`.
# Embeddings, pooler and classifier/LM heads sit outside the blocks and stay dense.
# The names Transformers gives a list of transformer blocks; one place for every regex that finds a block.
BLOCK_NAMES = r"(layer|layers|h|block|blocks)"  # a group: the saved default targets keep their original text
DEFAULT_TARGETS = (rf"(^|\.){BLOCK_NAMES}\.\d+\.",)
DEFAULT_EXCLUDE: tuple[str, ...] = ()

CONFIG_NAME = "pruning_config.json"
# obs: a block's Fisher inverse holds B x B floats for B weights, so B bounds a mask update's memory per weight.
MAX_OBS_BLOCK_SIZE = 1024


# Numeric options and what each allows, for the type check that runs before the range checks.
_NUMBER_OPTIONS = {
    **{name: "a sparsity must be a number in [0, 1)"
       for name in ("target_sparsity", "initial_sparsity", "head_sparsity", "neuron_sparsity")},
    **{name: "a fraction of training must be a number in [0, 1)" for name in ("warmup_fraction", "cooldown_fraction")},
    "regularization_lambda": "must be a number >= 0",
    "score_learning_rate": "must be a number > 0",
    "obs_damp": "must be a number > 0",
    "distillation_alpha": "must be a number in [0, 1]",
    "distillation_temperature": "must be a number > 0",
    "distillation_hidden_weight": "must be a number >= 0",
}


def _fail(option: str, value: Any, allowed: str) -> None:
    raise ValueError(f"PruningConfig.{option}={value!r} is invalid: {allowed}.")


class _LazyHelp(Mapping):
    """Field metadata whose help text is built when read, so `--help` lists methods registered after import."""

    def __init__(self, make_help: Callable[[], str]) -> None:
        self._make_help = make_help

    def __getitem__(self, key: str) -> str:
        if key != "help":
            raise KeyError(key)
        return self._make_help()

    def __iter__(self) -> Iterator[str]:
        return iter(("help",))

    def __len__(self) -> int:
        return 1

    def copy(self) -> dict[str, str]:  # HfArgumentParser copies field metadata into argparse keyword arguments
        return {"help": self._make_help()}


def _method_help() -> str:
    return (
        f"Importance criterion, one of the registered methods {list(available_methods())}: 'magnitude' (|W|), "
        "'movement' (accumulated -W*dL/dW, Sanh et al. 2020), 'soft_movement' (learned scores with a regulariser; "
        "PruningTrainer only), 'obs' (second-order: block-wise empirical Fisher, kept weights compensate the pruned "
        "ones; Kurtic et al. 2022), 'wanda' (|W| times input norms, Sun et al. 2023), 'sparsegpt' (one-shot only: "
        "hf_prune.oneshot), 'constant' (keep the zeros the model has; recovery after one-shot pruning), or any name "
        "added with hf_prune.register_method."
    )


@dataclass
class PruningConfig:
    """Configuration of pruning during fine-tuning.

    Sparsity is the fraction of zero weights among the targeted weights. Steps are optimizer steps (Trainer's
    `global_step`); fractions of training are fractions of the Trainer's `max_steps`.
    """

    method: str = field(default="magnitude", metadata=_LazyHelp(_method_help))
    target_sparsity: float = field(
        default=0.9, metadata={"help": "Final fraction of targeted weights set to zero, in [0, 1)."}
    )
    initial_sparsity: float = field(
        default=0.0, metadata={"help": "Sparsity applied at the first pruning step, in [0, target_sparsity]."}
    )
    schedule: Schedule = field(
        default="cubic",
        metadata={"help": "Sparsity over steps: 'cubic' (Zhu & Gupta 2017), 'linear' or 'one_shot'."},
    )
    warmup_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of training steps before pruning starts (dense fine-tuning)."}
    )
    cooldown_fraction: float = field(
        default=0.3,
        metadata={"help": "Fraction of training steps at the end with fixed masks, so the kept weights recover."},
    )
    pruning_interval: int = field(
        default=10, metadata={"help": "Optimizer steps between two mask updates while the schedule ramps."}
    )
    granularity: Granularity = field(
        default="unstructured",
        metadata={"help": "Pattern of zeros: 'unstructured', 'block' (see block_shape) or 'n:m' (see n_m)."},
    )
    block_shape: str = field(
        default="32x32",
        metadata={"help": "Block size 'ROWSxCOLS' over (out_features, in_features) for granularity='block'."},
    )
    n_m: str = field(
        default="2:4",
        metadata={
            "help": "For granularity='n:m': keep N of every M consecutive input weights, e.g. '2:4' (GPU "
            "semi-structured sparsity). The final sparsity is 1 - N/M and target_sparsity must equal it."
        },
    )
    scope: Scope = field(
        default="local",
        metadata={
            "help": "'local' (default) gives every targeted module the same sparsity; 'global' ranks all targeted "
            "weights together, so layers end up with different sparsity. Local is the default because global "
            "magnitude ranking empties layers whose weights are small by scale, not by importance: at 90 percent sparsity in a plain "
            "Trainer it kept 5.5 points less accuracy on the packaged MiniLM (benchmarks/results/two_lines.md)."
        },
    )
    targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={
            "help": "Regexes (re.search) over module names; matching nn.Linear/Conv1D modules are pruned. The default "
            "targets the Linear layers inside the transformer blocks."
        },
    )
    exclude: list[str] = field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        metadata={"help": "Regexes over module names that are never pruned, applied after `targets`."},
    )
    head_sparsity: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of all attention heads to remove, ranked across layers by accumulated importance, on "
            "the same schedule; masked during training and removed physically when it ends. 0 disables."
        },
    )
    neuron_sparsity: float = field(
        default=0.0,
        metadata={"help": "Fraction of all FFN intermediate neurons to remove, like head_sparsity. 0 disables."},
    )
    remove_structures: bool = field(
        default=True,
        metadata={"help": "Remove masked heads and neurons physically when training ends (smaller, faster model)."},
    )
    sparsity_overrides: Optional[Union[dict, str]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module target sparsity: {regex: sparsity}. Matching modules follow the same schedule to "
            "their own target, ranked locally; the others share `target_sparsity`. On the command line: a JSON string."
        },
    )
    regularization_lambda: float = field(
        default=1.0,
        metadata={"help": "soft_movement: weight of the mean-sigmoid(score) regulariser added to the loss."},
    )
    score_learning_rate: float = field(
        default=1e-2, metadata={"help": "soft_movement: learning rate of the learned scores."}
    )
    obs_block_size: int = field(
        default=32,
        metadata={
            "help": "obs: weights per Fisher block (consecutive weights of the flattened (out, in) matrix). Larger "
            "blocks see more correlations; a mask update's time grows as B per weight (BxB inverses per B weights)."
        },
    )
    obs_num_gradients: int = field(
        default=16,
        metadata={
            "help": "obs: how many of the most recent gradients make the empirical Fisher (kept in memory and in "
            "checkpoints: this many float32 copies of every targeted weight)."
        },
    )
    obs_damp: float = field(
        default=1e-2,
        metadata={
            "help": "obs: dampening of the empirical Fisher, relative to the layer's mean squared gradient "
            "(F = obs_damp * mean(g^2) * I + mean of g g^T over the kept gradients). Larger is more cautious (closer "
            "to magnitude pruning, smaller weight updates); must be > 0."
        },
    )
    distillation_alpha: float = field(
        default=0.5,
        metadata={
            "help": "PruningTrainer with a teacher: weight of the KL(teacher || student) term; the task loss gets "
            "1 - alpha."
        },
    )
    distillation_temperature: float = field(
        default=2.0, metadata={"help": "PruningTrainer with a teacher: softmax temperature of the distillation term."}
    )
    distillation_hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "PruningTrainer with a teacher: weight of the mean-squared error between the student's and the "
            "teacher's hidden states (layer by layer), added to the loss. A dense per-token signal that speeds up "
            "recovery from heavy pruning (layer-wise distillation, as in CoFi and oBERT recipes)."
        },
    )
    rewarm_after_pruning: bool = field(
        default=False,
        metadata={
            "help": "PruningTrainer: after the last mask update, bring the learning rate back to its peak and decay "
            "it linearly to 0 by the last step (learning-rate rewinding, Renda et al. 2020), so that the recovery "
            "after the final prune trains at full step size instead of the schedule's tail."
        },
    )
    allow_resume_changes: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint pruned under different settings (method, target, schedule, granularity, "
            "scope, targets, ...). By default that is refused, since the run would end where neither config says. "
            "When allowed, the checkpoint's masks and scores are kept and this config's schedule and pattern take "
            "over from the next pruning step."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if self.sparsity_overrides is None:
            self.sparsity_overrides = {}
        if isinstance(self.sparsity_overrides, str):
            # HfArgumentParser hands dict fields over as JSON strings.
            try:
                self.sparsity_overrides = json.loads(self.sparsity_overrides)
            except json.JSONDecodeError as err:
                _fail("sparsity_overrides", self.sparsity_overrides, f"give a JSON object of regex: sparsity ({err})")
        if not isinstance(self.sparsity_overrides, dict):
            _fail("sparsity_overrides", self.sparsity_overrides, "give a mapping of module-name regex to sparsity")
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the option, the value and what is allowed.

        `Pruner` calls it again when it starts, so a config changed after construction is checked where it is used.
        """
        # Types first: the range checks below would otherwise raise TypeError on strings and None, or take a bool
        # as 0 or 1 (a YAML `true` in the wrong place).
        for name, allowed in _NUMBER_OPTIONS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = "a bool" if isinstance(value, bool) else type(value).__name__
                _fail(name, value, f"{allowed}, not {kind}")
        for name in ("remove_structures", "allow_resume_changes", "rewarm_after_pruning"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                _fail(name, value, "give True or False (true/false in YAML, on the command line also yes/no)")
        for option in ("targets", "exclude"):
            patterns = getattr(self, option)
            if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
                _fail(option, patterns, "give a list of regular expressions (strings) over module names")
        if not isinstance(self.sparsity_overrides, dict):
            _fail("sparsity_overrides", self.sparsity_overrides, "give a mapping of module-name regex to sparsity")
        self.method_class()  # raises, naming the option, the value and the registered methods
        if self.schedule not in SCHEDULES:
            _fail("schedule", self.schedule, f"choose one of {SCHEDULES}")
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, f"choose one of {GRANULARITIES}")
        if self.scope not in SCOPES:
            _fail("scope", self.scope, f"choose one of {SCOPES}")
        for name in ("target_sparsity", "initial_sparsity", "head_sparsity", "neuron_sparsity"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                _fail(name, value, "a sparsity must lie in [0, 1)")
        if self.initial_sparsity > self.target_sparsity:
            _fail("initial_sparsity", self.initial_sparsity, f"must not exceed target_sparsity={self.target_sparsity}")
        for name in ("warmup_fraction", "cooldown_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                _fail(name, value, "a fraction of training must lie in [0, 1)")
        if self.warmup_fraction + self.cooldown_fraction >= 1.0:
            _fail(
                "warmup_fraction",
                self.warmup_fraction,
                f"warmup_fraction + cooldown_fraction ({self.cooldown_fraction}) must leave steps to prune in (< 1)",
            )
        if isinstance(self.pruning_interval, bool) or not isinstance(self.pruning_interval, int) \
                or self.pruning_interval < 1:
            _fail("pruning_interval", self.pruning_interval, "a positive number of steps")
        # Method options are checked whatever the method, so a config that switches method later never carries a
        # broken value; other methods ignore them.
        if not 0 <= self.regularization_lambda < float("inf"):  # written so that NaN fails too
            _fail("regularization_lambda", self.regularization_lambda, "must be a finite number >= 0")
        for name in ("obs_block_size", "obs_num_gradients"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "give a whole number >= 1")
        if self.obs_block_size > MAX_OBS_BLOCK_SIZE:
            _fail("obs_block_size", self.obs_block_size,
                  f"at most {MAX_OBS_BLOCK_SIZE} (each block's Fisher inverse is BxB: memory and time grow as B^2)")
        if not 0 < self.obs_damp < float("inf"):  # written so that NaN fails too
            _fail("obs_damp", self.obs_damp, "must be a finite number > 0")
        self.block_dims  # both patterns parse (and fail with a clear message) whatever the granularity
        n, m = self.n_m_values
        if self.granularity == "n:m":
            if abs(self.target_sparsity - (1 - n / m)) > 1e-6:
                _fail("target_sparsity", self.target_sparsity, f"with n_m={self.n_m!r} it must be 1 - N/M = {1 - n / m}")
            for pattern, value in self.sparsity_overrides.items():
                if isinstance(value, (int, float)) and value > 1 - n / m + 1e-6:
                    _fail("sparsity_overrides", {pattern: value}, f"with n_m={self.n_m!r} at most 1 - N/M = {1 - n / m}")
        for option in ("targets", "exclude"):
            for pattern in getattr(self, option):
                try:
                    re.compile(pattern)
                except re.error as err:
                    _fail(option, pattern, f"not a valid regular expression ({err})")
        if not self.targets:
            _fail("targets", self.targets, "give at least one regex")
        for pattern, value in self.sparsity_overrides.items():
            if not isinstance(pattern, str):
                _fail("sparsity_overrides", pattern, "keys must be regular expressions (strings) over module names")
            try:
                re.compile(pattern)
            except re.error as err:
                _fail("sparsity_overrides", pattern, f"keys must be valid regular expressions ({err})")
            if isinstance(value, bool):
                _fail("sparsity_overrides", {pattern: value}, "a sparsity must be a number in [0, 1), not a bool")
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                _fail("sparsity_overrides", {pattern: value}, "a sparsity must lie in [0, 1)")
        self.method_class().validate_config(self)
        # Written as `not value > 0` so that NaN fails too.
        if not self.score_learning_rate > 0:
            _fail("score_learning_rate", self.score_learning_rate, "must be > 0")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            _fail("distillation_alpha", self.distillation_alpha, "must lie in [0, 1]")
        if not self.distillation_hidden_weight >= 0:
            _fail("distillation_hidden_weight", self.distillation_hidden_weight, "must be >= 0")
        if not self.distillation_temperature > 0:
            _fail("distillation_temperature", self.distillation_temperature, "must be > 0")

    def method_class(self) -> type[PruningMethod]:
        """The registered `PruningMethod` subclass that `method` names: the one place a config's method is resolved,
        so every caller gets the same error for an unknown name and sees methods registered after the config."""
        return get_method(self.method)

    @property
    def block_dims(self) -> tuple[int, int]:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(self.block_shape))
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            _fail("block_shape", self.block_shape, "write it as 'ROWSxCOLS' with positive integers, e.g. '32x32'")
        return int(match.group(1)), int(match.group(2))

    @property
    def n_m_values(self) -> tuple[int, int]:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.n_m))
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            _fail("n_m", self.n_m, "write it as 'N:M' with 0 < N < M, e.g. '2:4'")
        return int(match.group(1)), int(match.group(2))

    def sparsity_override(self, module_name: str) -> Optional[float]:
        """The `sparsity_overrides` value of the first pattern that matches `module_name` (re.search), or None."""
        for pattern, sparsity in self.sparsity_overrides.items():
            if re.search(pattern, module_name):
                return float(sparsity)
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **self.to_dict()}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningConfig":
        """Build from a mapping of options. `format_version` (written by `save_pretrained`) is optional; a file from
        a newer hf_prune loads with a warning and its unknown keys ignored, while unknown keys in a file of this
        version or older (a typo in a YAML file) fail, naming the allowed options."""
        if not isinstance(data, Mapping):
            raise ValueError(f"A PruningConfig is built from a mapping of option: value, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            if isinstance(version, int) and version > FORMAT_VERSION:
                logger.warning(
                    "hf_prune: this pruning config was written by a newer hf_prune (format_version %s, this one reads "
                    "%s); ignoring the options it does not know: %s.", version, FORMAT_VERSION, unknown,
                )
                data = {k: v for k, v in data.items() if k in known}
            else:
                raise ValueError(f"Unknown PruningConfig option(s) {unknown}; allowed options are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str) -> "PruningConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"PruningConfig: {path!r} does not exist; give the {CONFIG_NAME} that save_pretrained wrote (or the "
                "folder holding it, with from_pretrained)."
            )
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"PruningConfig: {path} is not valid JSON ({err}); write it again with save_pretrained "
                             "or fix it by hand.") from None
        return cls._from_file_data(data, path)

    @classmethod
    def from_yaml(cls, path: str, section: Optional[str] = None) -> "PruningConfig":
        """Read a YAML file; `section` picks a nested mapping (e.g. 'pruning' in a main-job config)."""
        import yaml

        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"PruningConfig: {path} is not valid YAML ({err}).") from None
        if section is not None:
            if not isinstance(data, dict) or section not in data:
                keys = sorted(map(str, data)) if isinstance(data, dict) else f"none (it holds a {type(data).__name__})"
                raise ValueError(f"{path} has no section {section!r}; its top-level keys are {keys}.")
            data = data[section]
        return cls._from_file_data(data, path)

    @classmethod
    def _from_file_data(cls, data: Any, path: str) -> "PruningConfig":
        if not isinstance(data, dict):
            raise ValueError(f"PruningConfig: {path} must hold a mapping of option: value (e.g. target_sparsity: 0.9), "
                             f"got a {type(data).__name__}.")
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str) -> str:
        return atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(cls, directory: str) -> "PruningConfig":
        return cls.from_json(os.path.join(directory, CONFIG_NAME))
