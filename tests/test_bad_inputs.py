"""Bad input, a catalogue: every invalid value, file or path fails early with an error that names the option (or the
file), the value and what is allowed -- never a raw JSONDecodeError, AttributeError, IndexError, KeyError,
UnpicklingError or HFValidationError from deep inside, and never a hint to load with `weights_only=False`.

Each row is (how to provoke it, the exception type, fragments its message must hold). Command-line rows call
`hf_prune.cli.main` and expect a SystemExit whose text is the message (what the user sees on stderr).
"""

# Count when this catalogue was written (issue 15): 114 rows. 56 were already clear; 58 were fixed in the library.
# Rows marked
# `# fixed:` say what happened before. The fixes, by place:
#   config.py, PruningConfig.validate: numbers type-checked before the range checks (str/None/list raised TypeError,
#     a bool passed as 0 or 1), NaN refused, bool options must be bools, targets/exclude must be lists of strings,
#     sparsity_overrides keys strings and values not bools, and a non-dict sparsity_overrides refused (18 rows:
#     config-target_sparsity-false, config-warmup_fraction-string, config-cooldown_fraction-none,
#     config-distillation_alpha-true, config-temperature-string, config-score_learning_rate-nan,
#     config-regularization_lambda-string, config-interval-true, config-remove_structures-no,
#     config-allow_resume_changes-no, config-targets-none, config-targets-number, config-exclude-none-entry,
#     overrides-bool, overrides-number-key, cli-config-list-for-float, mutated-targets-string-pruner,
#     mutated-overrides-string-pruner);
#   config.py, from_json / from_yaml / from_dict: missing file, invalid JSON or YAML, a list instead of a mapping
#     (5: pruning-config-invalid-json, pruning-config-a-list, pruning-config-missing, from-yaml-syntax-error,
#     from-yaml-a-list);
#   pruner.py, Pruner.__init__: a non-PruningConfig refused and the config validated again at use (6:
#     pruner-config-is-a-dict, mutated-target-pruner, mutated-warmup-string-pruner, mutated-target-trainer,
#     mutated-schedule-trainer, mutated-target-callback);
#   methods/base.py, get_method: ValueError naming PruningConfig.method instead of a KeyError (1:
#     mutated-method-callback);
#   pruner.py, Pruner.load / load_state_dict: missing, truncated, non-torch and pickled files, and states of another
#     shape or model, named with the file (8: state-*);
#   structure/io.py, load_pruned: missing folder, a file, no config.json, Hub ids offline or invalid, truncated
#     config.json and safetensors, a structure record that does not fit (9: load-*, structure-layer-not-in-config,
#     structure-neuron-not-in-config);
#   cli.py: invalid --config YAML, and argparse errors carried in the SystemExit (7: cli-config-yaml-syntax,
#     cli-config-string-for-float, cli-config-bad-bool, cli-target_sparsity-abc, cli-schedule-choice,
#     cli-export-bad-quantize, cli-benchmark-seq-len-word);
#   job.py: --model_name_or_path / --teacher_path that do not exist named as such (2: cli-model-missing,
#     cli-teacher-missing).
#   trainer.py: a deeper teacher with hidden-state distillation (its first layers were silently matched to the
#     student's), and an LM teacher of another vocabulary (a RuntimeError from a reshape at the first step) (2:
#     teacher-deeper, teacher-vocabulary).
#   trainer.py: a classifier teacher with a smaller input vocabulary than the student's (IndexError in its embedding
#     at the first step) and a teacher with another kind of head (2: teacher-input-vocabulary, teacher-other-head).

from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any, Callable

import pytest
import torch
import transformers
from conftest import (
    WORDS,
    build_model,
    random_classification_data,
    save_named_classifier,
    tiny_bert,
    training_args,
    write_csv,
)
from datasets import Dataset
from huggingface_hub.errors import HFValidationError

from hf_prune import (
    PruningCallback,
    PruningConfig,
    PruningTrainer,
    Pruner,
    export_onnx,
    load_pruned,
    prune_heads,
)
from hf_prune.cli import main
from hf_prune.pruner import STATE_NAME
from hf_prune.structure import STRUCTURE_NAME

# Errors that mean "crashed somewhere inside" rather than "refused your input".
RAW_ERRORS = (json.JSONDecodeError, AttributeError, IndexError, KeyError, pickle.UnpicklingError, HFValidationError)


# ------------------------------------------------------------------------------------------------ builders
def config(**kwargs: Any) -> Callable:
    return lambda tmp: PruningConfig(**kwargs)


def mutated(**changes: Any) -> PruningConfig:
    """A valid config changed after construction, as a notebook cell might do."""
    result = PruningConfig()
    for name, value in changes.items():
        setattr(result, name, value)
    return result


def pruner_with(**changes: Any) -> Callable:
    return lambda tmp: Pruner(tiny_bert(), mutated(**changes))


def build_pruner(**kwargs: Any) -> Callable:
    return lambda tmp: Pruner(tiny_bert(), PruningConfig(**kwargs))


def trainer(tmp, pruning_config=None, model=None, teacher=None, dataset=None, **args):
    return PruningTrainer(
        model=model if model is not None else tiny_bert(),
        args=training_args(tmp / "run", max_steps=1, **args),
        pruning_config=pruning_config,
        teacher_model=teacher,
        train_dataset=dataset if dataset is not None else random_classification_data(n=16),
    )


def callback_in_plain_trainer(tmp):
    callback = PruningCallback(PruningConfig())
    callback.config.target_sparsity = 2.0  # changed after the callback was made, before the Trainer builds the pruner
    transformers.Trainer(model=tiny_bert(), args=training_args(tmp / "run", max_steps=1), callbacks=[callback],
                         train_dataset=random_classification_data(n=16))


def callback_with_unknown_method(tmp):
    PruningCallback(mutated(method="nope"))


# --- pruning state files
def state_bytes(state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def good_state() -> dict:
    return Pruner(tiny_bert(), PruningConfig()).state_dict()


def load_state(make_bytes: Callable[[], bytes]) -> Callable:
    def call(tmp):
        (tmp / STATE_NAME).write_bytes(make_bytes())
        Pruner(tiny_bert(), PruningConfig()).load(str(tmp))

    return call


def truncated_state() -> bytes:
    data = state_bytes(good_state())
    return data[: len(data) // 2]


class NotATensor:
    """Any pickled object but tensors and plain containers: weights_only loading refuses it."""


def state_with(**changes: Any) -> Callable[[], bytes]:
    def make() -> bytes:
        state = good_state()
        for key, value in changes.items():
            if value is None:
                state.pop(key)
            else:
                state[key] = value
        return state_bytes(state)

    return make


def wrong_shape_mask() -> dict:
    first = next(iter(Pruner(tiny_bert(), PruningConfig()).modules))
    return {first: torch.zeros(2, dtype=torch.bool)}


# --- saved models for load_pruned
def saved_bert(tmp) -> str:
    model = build_model("bert")
    prune_heads(model, {0: [1]})
    model.save_pretrained(tmp / "model")
    return str(tmp / "model")


def load_with_structure_file(text: str) -> Callable:
    def call(tmp):
        folder = saved_bert(tmp)
        with open(os.path.join(folder, STRUCTURE_NAME), "w", encoding="utf-8") as handle:
            handle.write(text)
        load_pruned(folder)

    return call


def load_with_truncated(name: str) -> Callable:
    def call(tmp):
        folder = saved_bert(tmp)
        path = os.path.join(folder, name)
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        load_pruned(folder)

    return call


def load_without_config(tmp):
    folder = saved_bert(tmp)
    os.remove(os.path.join(folder, "config.json"))
    load_pruned(folder)


def load_a_file(tmp):
    folder = saved_bert(tmp)
    load_pruned(os.path.join(folder, "config.json"))


def pruning_config_file(text: str) -> Callable:
    def call(tmp):
        (tmp / "pruning_config.json").write_text(text, encoding="utf-8")
        PruningConfig.from_pretrained(str(tmp))

    return call


def yaml_file(text: str) -> Callable:
    def call(tmp):
        (tmp / "pruning.yaml").write_text(text, encoding="utf-8")
        PruningConfig.from_yaml(str(tmp / "pruning.yaml"))

    return call


# --- teachers
def teacher_run(teacher_factory: Callable, **pruning: Any) -> Callable:
    def call(tmp):
        run = trainer(tmp, PruningConfig(target_sparsity=0.5, **pruning), teacher=teacher_factory())
        run.train()

    return call


def bert_teacher(**kwargs: Any):
    def make():
        torch.manual_seed(1)
        settings = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
        settings.update(kwargs)
        return transformers.BertForSequenceClassification(transformers.BertConfig(**settings))

    return make


def lm_teacher_of_another_vocabulary(tmp):
    def gpt2(vocab_size: int):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64))

    ids = torch.randint(0, 100, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 16, "labels": ids})
    run = trainer(tmp, PruningConfig(target_sparsity=0.5), model=gpt2(100), teacher=gpt2(120), dataset=data)
    run.train()


# --- command line
def cli(*argv: str, config_text: str = None, model: bool = False, csv_header=None) -> Callable:
    """`hf_prune.cli.main(argv)`; `{tmp}` in argv is the test folder, `{model}` a saved 3-label classifier and
    `{csv}` a CSV of labelled rows (with `csv_header`), `{config}` a YAML file holding `config_text`."""

    def call(tmp):
        values = {"tmp": str(tmp)}
        if config_text is not None:
            (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
            values["config"] = str(tmp / "config.yaml")
        if model:
            values["model"] = save_named_classifier(tmp / "model")
        if csv_header is not None:
            rows = [(f"{WORDS[i % 10]} {WORDS[(i * 3) % 10]}", ("bad", "good", "meh")[i % 3]) for i in range(30)]
            values["csv"] = write_csv(tmp / "data.csv", rows, header=csv_header)
        main([part.format(**values) for part in argv])

    return call


TRAIN = ("train", "--output_dir", "{tmp}/out", "--max_steps", "1")


def saved_checkpoint_cli(*argv: str) -> Callable:
    def call(tmp):
        folder = saved_bert(tmp)
        main([part.format(tmp=str(tmp), model=folder) for part in argv])

    return call


def export_call(folder: str = None, **kwargs: Any) -> Callable:
    def call(tmp):
        source = folder.format(tmp=str(tmp)) if folder else saved_bert(tmp)
        export_onnx(source, str(tmp / "onnx"), **kwargs)

    return call



# ------------------------------------------------------------------------------------------------ the catalogue
CASES = [
    # ---------------------------------------------------------------- PruningConfig values of the wrong type
    pytest.param(config(target_sparsity="0.9"), ValueError, ("PruningConfig.target_sparsity='0.9'", "[0, 1)"),
                 id="config-target_sparsity-string"),
    pytest.param(config(target_sparsity=False), ValueError,  # fixed: False was taken as 0
                 ("PruningConfig.target_sparsity=False", "not a bool"), id="config-target_sparsity-false"),
    pytest.param(config(head_sparsity=True), ValueError, ("PruningConfig.head_sparsity=True", "[0, 1)"),
                 id="config-head_sparsity-true"),  # True is 1, outside [0, 1): refused before this file too
    pytest.param(config(neuron_sparsity=None), ValueError, ("PruningConfig.neuron_sparsity=None", "[0, 1)"),
                 id="config-neuron_sparsity-none"),
    pytest.param(config(warmup_fraction="0.1"), ValueError,  # fixed: TypeError from `0.0 <= '0.1'`
                 ("PruningConfig.warmup_fraction='0.1'", "[0, 1)"), id="config-warmup_fraction-string"),
    pytest.param(config(cooldown_fraction=None), ValueError,  # fixed: TypeError from `0.0 <= None`
                 ("PruningConfig.cooldown_fraction=None", "[0, 1)"), id="config-cooldown_fraction-none"),
    pytest.param(config(distillation_alpha=True), ValueError,  # fixed: True was taken as alpha 1
                 ("PruningConfig.distillation_alpha=True", "[0, 1]"), id="config-distillation_alpha-true"),
    pytest.param(config(distillation_temperature="2"), ValueError,  # fixed: TypeError from `'2' <= 0`
                 ("PruningConfig.distillation_temperature='2'", "> 0"), id="config-temperature-string"),
    pytest.param(config(score_learning_rate=float("nan")), ValueError,  # fixed: NaN passed `nan <= 0`
                 ("PruningConfig.score_learning_rate=nan", "> 0"), id="config-score_learning_rate-nan"),
    pytest.param(config(method="soft_movement", regularization_lambda="1"), ValueError,  # fixed: TypeError
                 ("PruningConfig.regularization_lambda='1'", ">= 0"), id="config-regularization_lambda-string"),
    pytest.param(config(pruning_interval=True), ValueError,  # fixed: True was taken as 1 step
                 ("PruningConfig.pruning_interval=True", "positive number of steps"), id="config-interval-true"),
    pytest.param(config(pruning_interval=2.5), ValueError, ("PruningConfig.pruning_interval=2.5", "positive"),
                 id="config-interval-float"),
    pytest.param(config(remove_structures="no"), ValueError,  # fixed: the string "no" was truthy
                 ("PruningConfig.remove_structures='no'", "True or False"), id="config-remove_structures-no"),
    pytest.param(config(allow_resume_changes="no"), ValueError,  # fixed: the string "no" was truthy
                 ("PruningConfig.allow_resume_changes='no'", "True or False"), id="config-allow_resume_changes-no"),
    pytest.param(config(method=["magnitude"]), ValueError, ("PruningConfig.method=['magnitude']", "registered"),
                 id="config-method-list"),
    pytest.param(config(n_m=["2:4"]), ValueError, ("PruningConfig.n_m=['2:4']", "'N:M'"), id="config-n_m-list"),
    pytest.param(config(targets=None), ValueError,  # fixed: TypeError iterating None
                 ("PruningConfig.targets=None", "list of regular expressions"), id="config-targets-none"),
    pytest.param(config(targets=[r"layer\.\d+\.", 3]), ValueError,  # fixed: TypeError from re.compile(3)
                 ("PruningConfig.targets=", "3", "list of regular expressions"), id="config-targets-number"),
    pytest.param(config(exclude=[None]), ValueError,  # fixed: TypeError from re.compile(None)
                 ("PruningConfig.exclude=[None]", "list of regular expressions"), id="config-exclude-none-entry"),
    # ---------------------------------------------------------------- PruningConfig values out of range
    pytest.param(config(target_sparsity=1.0), ValueError, ("PruningConfig.target_sparsity=1.0", "[0, 1)"),
                 id="config-target_sparsity-one"),
    pytest.param(config(initial_sparsity=0.95), ValueError, ("PruningConfig.initial_sparsity=0.95", "target_sparsity"),
                 id="config-initial-above-target"),
    pytest.param(config(warmup_fraction=0.6, cooldown_fraction=0.5), ValueError,
                 ("PruningConfig.warmup_fraction=0.6", "cooldown_fraction"), id="config-fractions-sum"),
    pytest.param(config(pruning_interval=0), ValueError, ("PruningConfig.pruning_interval=0", "positive"),
                 id="config-interval-zero"),
    pytest.param(config(distillation_alpha=1.5), ValueError, ("PruningConfig.distillation_alpha=1.5", "[0, 1]"),
                 id="config-alpha-above-one"),
    pytest.param(config(distillation_hidden_weight=-1.0), ValueError,
                 ("PruningConfig.distillation_hidden_weight=-1.0", ">= 0"), id="config-hidden-weight-negative"),
    pytest.param(config(distillation_temperature=0), ValueError, ("PruningConfig.distillation_temperature=0", "> 0"),
                 id="config-temperature-zero"),
    pytest.param(config(method="soft_movement", regularization_lambda=-1.0), ValueError,
                 ("PruningConfig.regularization_lambda=-1.0", ">= 0"), id="config-regularization-negative"),
    # ---------------------------------------------------------------- names and patterns
    pytest.param(config(method="random"), ValueError, ("PruningConfig.method='random'", "'magnitude'"),
                 id="config-method-unknown"),
    pytest.param(config(schedule="exponential"), ValueError, ("PruningConfig.schedule='exponential'", "'cubic'"),
                 id="config-schedule-unknown"),
    pytest.param(config(granularity="channel"), ValueError, ("PruningConfig.granularity='channel'", "'block'"),
                 id="config-granularity-unknown"),
    pytest.param(config(scope="globl"), ValueError, ("PruningConfig.scope='globl'", "'global'"),
                 id="config-scope-unknown"),
    pytest.param(config(granularity="block", block_shape="32"), ValueError,
                 ("PruningConfig.block_shape='32'", "'ROWSxCOLS'"), id="config-block_shape-one-number"),
    pytest.param(config(granularity="block", block_shape="0x4"), ValueError,
                 ("PruningConfig.block_shape='0x4'", "positive integers"), id="config-block_shape-zero"),
    pytest.param(config(granularity="n:m", n_m="2/4", target_sparsity=0.5), ValueError,
                 ("PruningConfig.n_m='2/4'", "'N:M'"), id="config-n_m-slash"),
    pytest.param(config(granularity="n:m", n_m="2:4", target_sparsity=0.9), ValueError,
                 ("PruningConfig.target_sparsity=0.9", "1 - N/M"), id="config-n_m-target-mismatch"),
    pytest.param(config(targets=["layer.(\\d+"]), ValueError, ("PruningConfig.targets='layer.(\\\\d+'", "regular"),
                 id="config-targets-bad-regex"),
    pytest.param(config(targets=[]), ValueError, ("PruningConfig.targets=[]", "at least one"),
                 id="config-targets-empty"),
    # ---------------------------------------------------------------- sparsity_overrides
    pytest.param(config(sparsity_overrides="{attention: 0.5"), ValueError,
                 ("PruningConfig.sparsity_overrides='{attention: 0.5'", "JSON object"), id="overrides-not-json"),
    pytest.param(config(sparsity_overrides="[0.5]"), ValueError,
                 ("PruningConfig.sparsity_overrides=[0.5]", "mapping"), id="overrides-json-list"),
    pytest.param(config(sparsity_overrides={"attention": 1.5}), ValueError,
                 ("PruningConfig.sparsity_overrides={'attention': 1.5}", "[0, 1)"), id="overrides-out-of-range"),
    pytest.param(config(sparsity_overrides={"attention": "half"}), ValueError,
                 ("PruningConfig.sparsity_overrides={'attention': 'half'}", "[0, 1)"), id="overrides-not-numeric"),
    pytest.param(config(sparsity_overrides={"attention": False}), ValueError,  # fixed: False was taken as 0
                 ("PruningConfig.sparsity_overrides={'attention': False}", "not a bool"), id="overrides-bool"),
    pytest.param(config(sparsity_overrides={1: 0.5}), ValueError,  # fixed: TypeError from re.compile(1)
                 ("PruningConfig.sparsity_overrides=1", "regular expressions"), id="overrides-number-key"),
    pytest.param(config(sparsity_overrides={"(": 0.5}), ValueError,
                 ("PruningConfig.sparsity_overrides='('", "regular expressions"), id="overrides-bad-regex"),
    # ---------------------------------------------------------------- patterns that do not fit the model
    pytest.param(build_pruner(targets=["no_such_module"]), ValueError,
                 ("PruningConfig.targets", "'no_such_module'", "Prunable modules are, for example"),
                 id="pruner-targets-match-nothing"),
    pytest.param(build_pruner(sparsity_overrides={"no_such_module": 0.5}), ValueError,
                 ("PruningConfig.sparsity_overrides key 'no_such_module'", "targeted modules are"),
                 id="pruner-overrides-match-nothing"),
    pytest.param(build_pruner(granularity="block", block_shape="5x5"), ValueError,
                 ("PruningConfig.block_shape='5x5'", "must divide 32"), id="pruner-block-does-not-tile"),
    pytest.param(lambda tmp: Pruner(tiny_bert(), {"target_sparsity": 0.5}), TypeError,  # fixed: AttributeError
                 ("Pruner takes a PruningConfig", "dict"), id="pruner-config-is-a-dict"),
    # ---------------------------------------------------------------- configs changed after construction
    pytest.param(pruner_with(target_sparsity=2.0), ValueError,  # fixed: Pruner did not re-validate its config
                 ("PruningConfig.target_sparsity=2.0", "[0, 1)"), id="mutated-target-pruner"),
    pytest.param(pruner_with(warmup_fraction="0.1"), ValueError,  # fixed: Pruner did not re-validate its config
                 ("PruningConfig.warmup_fraction='0.1'", "[0, 1)"), id="mutated-warmup-string-pruner"),
    pytest.param(pruner_with(targets=r"layer\.\d+\."), ValueError,  # fixed: a string was iterated per character
                 ("PruningConfig.targets=", "list of regular expressions"), id="mutated-targets-string-pruner"),
    pytest.param(pruner_with(sparsity_overrides='{"attention": 0.5}'), ValueError,  # fixed: AttributeError .items
                 ("PruningConfig.sparsity_overrides=", "mapping"), id="mutated-overrides-string-pruner"),
    pytest.param(lambda tmp: trainer(tmp, mutated(target_sparsity=2.0)), ValueError,  # fixed: by Pruner's check
                 ("PruningConfig.target_sparsity=2.0", "[0, 1)"), id="mutated-target-trainer"),
    pytest.param(lambda tmp: trainer(tmp, mutated(schedule="exponential")), ValueError,  # fixed: by Pruner's check
                 ("PruningConfig.schedule='exponential'", "'cubic'"), id="mutated-schedule-trainer"),
    pytest.param(callback_in_plain_trainer, ValueError,  # fixed: by Pruner's check
                 ("PruningConfig.target_sparsity=2.0", "[0, 1)"), id="mutated-target-callback"),
    pytest.param(callback_with_unknown_method, ValueError,  # fixed: get_method raised a raw KeyError
                 ("PruningConfig.method='nope'", "registered methods"), id="mutated-method-callback"),
    # ---------------------------------------------------------------- hf_prune_state.pt
    pytest.param(load_state(truncated_state), ValueError,  # fixed: raw RuntimeError from the zip reader
                 (STATE_NAME, "truncated"), id="state-truncated"),
    pytest.param(load_state(lambda: b"hello, not a torch file"), ValueError,  # fixed: raw KeyError: 101
                 (STATE_NAME, "not written by"), id="state-not-a-torch-file"),
    pytest.param(load_state(lambda: pickle.dumps(NotATensor())), ValueError,  # fixed: suggested weights_only=False
                 (STATE_NAME, "objects other than tensors"), id="state-pickled-object",
                 marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")),
    pytest.param(load_state(lambda: state_bytes([1, 2])), ValueError,  # fixed: AttributeError list.get
                 (STATE_NAME, "not a pruning state", "list"), id="state-a-list"),
    pytest.param(load_state(state_with(masks=None)), ValueError,  # fixed: KeyError 'masks'
                 (STATE_NAME, "not a pruning state", "'masks'"), id="state-without-masks"),
    pytest.param(load_state(state_with(masks={"other.module": torch.zeros(2, dtype=torch.bool)})), ValueError,
                 (STATE_NAME, "other.module", "does not target"), id="state-for-other-modules"),  # fixed: no file
    pytest.param(load_state(lambda: state_bytes({**good_state(), "masks": wrong_shape_mask()})), ValueError,
                 (STATE_NAME, "has shape (2,)", "(32, 32)"), id="state-mask-wrong-shape"),  # fixed: no file named
    pytest.param(lambda tmp: Pruner(tiny_bert(), PruningConfig()).load(str(tmp)), FileNotFoundError,
                 (STATE_NAME, str, "hf_prune saved"), id="state-missing"),  # fixed: bare errno message
    # ---------------------------------------------------------------- hf_prune_structure.json and config.json
    pytest.param(load_with_structure_file("{not json"), ValueError, (STRUCTURE_NAME, "not valid JSON"),
                 id="structure-invalid-json"),
    pytest.param(load_with_structure_file("[1, 2]"), ValueError, (STRUCTURE_NAME, "JSON object", "list"),
                 id="structure-a-list"),
    pytest.param(load_with_structure_file('{"pruned_heads": [1, 2]}'), ValueError,
                 (STRUCTURE_NAME, "malformed", "map layer indices"), id="structure-heads-wrong-type"),
    pytest.param(load_with_structure_file('{"pruned_heads": {"5": [0]}}'), ValueError,  # fixed: file not named
                 ("structure record", "does not fit", "layer 5"), id="structure-layer-not-in-config"),
    pytest.param(load_with_structure_file('{"pruned_neurons": {"0": [999]}}'), ValueError,  # fixed: file not named
                 ("structure record", "does not fit", "[999]"), id="structure-neuron-not-in-config"),
    pytest.param(load_with_structure_file('{"heads_per_layer": [1, 1]}'), ValueError,
                 ("heads_per_layer=[1, 1]", "does not belong to this config"), id="structure-sizes-disagree"),
    pytest.param(load_with_truncated("config.json"), ValueError,  # fixed: OSError from AutoConfig
                 ("config.json", "not valid JSON"), id="load-config-json-truncated"),
    pytest.param(load_with_truncated("model.safetensors"), ValueError,  # fixed: raw SafetensorError
                 ("model.safetensors", "truncated"), id="load-safetensors-truncated"),
    pytest.param(pruning_config_file("{not json"), ValueError,  # fixed: raw JSONDecodeError
                 ("pruning_config.json", "not valid JSON"), id="pruning-config-invalid-json"),
    pytest.param(pruning_config_file("[1, 2]"), ValueError,  # fixed: TypeError from dict([1, 2])
                 ("pruning_config.json", "mapping of option", "list"), id="pruning-config-a-list"),
    pytest.param(pruning_config_file('{"target_sparsity": "high"}'), ValueError,
                 ("PruningConfig.target_sparsity='high'", "[0, 1)"), id="pruning-config-wrong-type"),
    pytest.param(lambda tmp: PruningConfig.from_pretrained(str(tmp)), FileNotFoundError,  # fixed: bare errno
                 ("pruning_config.json", "save_pretrained"), id="pruning-config-missing"),
    pytest.param(yaml_file("target_sparsity: [0.5\n"), ValueError,  # fixed: raw yaml ParserError
                 ("pruning.yaml", "not valid YAML"), id="from-yaml-syntax-error"),
    pytest.param(yaml_file("- target_sparsity\n"), ValueError,  # fixed: TypeError from dict(list)
                 ("pruning.yaml", "mapping of option", "list"), id="from-yaml-a-list"),
    # ---------------------------------------------------------------- load_pruned paths
    pytest.param(lambda tmp: load_pruned(str(tmp / "no" / "such" / "folder")), FileNotFoundError,  # fixed: HFValid.
                 ("no/such/folder", "does not exist"), id="load-missing-folder"),
    pytest.param(load_a_file, FileNotFoundError, ("config.json", "not a folder"),  # fixed: HFValidationError
                 id="load-a-file"),
    pytest.param(load_without_config, FileNotFoundError, ("no config.json", "save_pretrained"),  # fixed: built
                 id="load-folder-without-config"),  # a model from a config found elsewhere, then failed on classes
    pytest.param(lambda tmp: load_pruned("someone/not-a-cached-model"), FileNotFoundError,  # fixed: raw hub error
                 ("'someone/not-a-cached-model'", "not a local folder", "Hub"), id="load-hub-id-offline"),
    pytest.param(lambda tmp: load_pruned("not a valid id!"), FileNotFoundError,  # fixed: raw HFValidationError
                 ("'not a valid id!'", "not a local folder", "Hub repo id"), id="load-invalid-hub-id"),
    # ---------------------------------------------------------------- distillation teachers
    pytest.param(teacher_run(bert_teacher(num_labels=2)), ValueError,
                 ("teacher_model has num_labels=2", "has 3"), id="teacher-num-labels"),
    pytest.param(teacher_run(bert_teacher(hidden_size=48, num_attention_heads=4), distillation_hidden_weight=1.0),
                 ValueError, ("teacher", "hidden size (32)", "got 48"), id="teacher-hidden-size"),
    pytest.param(teacher_run(bert_teacher(num_hidden_layers=1), distillation_hidden_weight=1.0), ValueError,
                 ("teacher", "as many layers", "1 in the teacher, 2 in the student"), id="teacher-shallower"),
    pytest.param(teacher_run(bert_teacher(num_hidden_layers=3), distillation_hidden_weight=1.0), ValueError,
                 ("teacher", "as many layers", "3 in the teacher, 2 in the student"),
                 id="teacher-deeper"),  # fixed: a deeper teacher's first layers were matched to the student's
    pytest.param(lm_teacher_of_another_vocabulary, ValueError, ("teacher_model", "120", "100"),
                 id="teacher-vocabulary"),  # fixed: a RuntimeError from a reshape in distillation_loss
    pytest.param(teacher_run(bert_teacher(vocab_size=50)), ValueError,
                 ("teacher_model reads token ids below 50", "up to 99"),
                 id="teacher-input-vocabulary"),  # fixed: IndexError inside the teacher's embedding at the first step
    pytest.param(teacher_run(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))), ValueError,
                 ("teacher_model predicts vocabulary (100)", "the model predicts labels (3)"),
                 id="teacher-other-head"),  # fixed: an LM teacher for a classifier failed inside the KL
    # ---------------------------------------------------------------- hf-prune train: --config files
    pytest.param(cli("train", "--config", "{config}", config_text="target_sparsity: [0.5\n"), SystemExit,
                 ("config.yaml", "not valid YAML", "line"), id="cli-config-yaml-syntax"),  # fixed: raw ParserError
    pytest.param(cli("train", "--config", "{config}", config_text="- target_sparsity: 0.5\n"), SystemExit,
                 ("config.yaml", "mapping of option: value", "list"), id="cli-config-top-level-list"),
    pytest.param(cli("train", "--config", "{config}", config_text="target_sparsty: 0.5\n"), SystemExit,
                 ("'target_sparsty'", "did you mean 'target_sparsity'"), id="cli-config-unknown-key"),
    pytest.param(cli(*TRAIN, "--config", "{config}", config_text="target_sparsity: high\n"), SystemExit,
                 ("--target_sparsity", "invalid float value: 'high'"), id="cli-config-string-for-float"),  # fixed
    pytest.param(cli(*TRAIN, "--config", "{config}", config_text="warmup_fraction: [0.1]\n"), SystemExit,
                 ("PruningConfig.warmup_fraction=[0.1]", "[0, 1)"), id="cli-config-list-for-float"),  # fixed
    pytest.param(cli(*TRAIN, "--config", "{config}", config_text="remove_structures: maybe\n"), SystemExit,
                 ("--remove_structures", "maybe", "yes/no"), id="cli-config-bad-bool"),  # fixed: empty exit 2
    pytest.param(cli(*TRAIN, "--config", "{config}", config_text="pruning_interval: 2.5\n"), SystemExit,
                 ("PruningConfig.pruning_interval=2.5", "positive"), id="cli-config-float-for-int"),
    # ---------------------------------------------------------------- hf-prune train: flags and data
    pytest.param(cli(*TRAIN, "--target_sparsity", "abc"), SystemExit,  # fixed: argparse's empty SystemExit(2)
                 ("--target_sparsity", "invalid float value: 'abc'"), id="cli-target_sparsity-abc"),
    pytest.param(cli(*TRAIN, "--head_sparsity", "1.5"), SystemExit, ("PruningConfig.head_sparsity=1.5", "[0, 1)"),
                 id="cli-head_sparsity-out-of-range"),
    pytest.param(cli(*TRAIN, "--schedule", "exponential"), SystemExit,  # fixed: argparse's empty SystemExit(2)
                 ("--schedule", "invalid choice: 'exponential'", "'cubic'"), id="cli-schedule-choice"),
    pytest.param(cli(*TRAIN, "--sparsity_overrides", '{{"attention": 2}}'), SystemExit,
                 ("PruningConfig.sparsity_overrides={'attention': 2}", "[0, 1)"), id="cli-overrides-out-of-range"),
    pytest.param(cli(*TRAIN, "--train_file", "{tmp}/missing.csv"), SystemExit,
                 ("--train_file", "missing.csv", "does not exist"), id="cli-train-file-missing"),
    pytest.param(cli(*TRAIN, "--model_name_or_path", "{model}", "--train_file", "{csv}", "--text_columns", "body",
                     model=True, csv_header=("review", "label")), SystemExit,
                 ("'body'", "review"), id="cli-csv-without-text-column"),
    pytest.param(cli(*TRAIN, "--model_name_or_path", "{model}", "--train_file", "{csv}", "--label_column", "stars",
                     model=True, csv_header=("text", "label")), SystemExit,
                 ("'stars'", "label"), id="cli-csv-without-label-column"),
    pytest.param(cli(*TRAIN, "--model_name_or_path", "{tmp}/no/such/model", "--train_file", "{csv}",
                     csv_header=("text", "label")), SystemExit,  # fixed: a Hub repo-id error, option not named
                 ("--model_name_or_path", "no/such/model", "does not exist"), id="cli-model-missing"),
    pytest.param(cli(*TRAIN, "--model_name_or_path", "{model}", "--train_file", "{csv}", "--teacher_path",
                     "{tmp}/no/such/teacher", model=True, csv_header=("text", "label")), SystemExit,  # fixed: same
                 ("--teacher_path", "no/such/teacher", "does not exist"), id="cli-teacher-missing"),
    # ---------------------------------------------------------------- export and benchmark
    pytest.param(export_call(folder="{tmp}/missing"), FileNotFoundError, ("missing", "not a directory"),
                 id="export-missing-folder"),
    pytest.param(export_call(quantize="static"), ValueError, ("quantize='static'", "dynamic"),
                 id="export-bad-quantize"),
    pytest.param(export_call(optimize="O4"), ValueError, ("optimize='O4'", "'O1'"), id="export-bad-optimize"),
    pytest.param(export_call(tolerance=-1.0), ValueError, ("tolerance=-1.0", ">= 0"), id="export-negative-tolerance"),
    pytest.param(cli("export", "{tmp}/missing", "{tmp}/onnx"), SystemExit, ("missing", "not a directory"),
                 id="cli-export-missing-folder"),
    pytest.param(saved_checkpoint_cli("export", "{model}", "{tmp}/onnx", "--quantize", "static"), SystemExit,
                 ("--quantize", "invalid choice: 'static'", "'dynamic'"), id="cli-export-bad-quantize"),  # fixed
    pytest.param(cli("benchmark", "{tmp}/nope", "--runtimes", "pytorch", "--eval_size", "0"), SystemExit,
                 ("checkpoints", "nope", "not a directory"), id="cli-benchmark-missing-checkpoint"),
    pytest.param(saved_checkpoint_cli("benchmark", "{model}", "--runtimes", "tensorflow", "--eval_size", "0"),
                 SystemExit, ("runtimes=['tensorflow']", "pytorch"), id="cli-benchmark-bad-runtime"),
    pytest.param(saved_checkpoint_cli("benchmark", "{model}", "--batch_sizes", "0", "--eval_size", "0"),
                 SystemExit, ("batch_sizes=[0]", "positive"), id="cli-benchmark-batch-zero"),
    pytest.param(saved_checkpoint_cli("benchmark", "{model}", "--seq_len", "long"), SystemExit,  # fixed: empty exit
                 ("--seq_len", "invalid int value: 'long'"), id="cli-benchmark-seq-len-word"),
]


@pytest.mark.parametrize("provoke, error, fragments", CASES)
def test_bad_input_fails_early_naming_it_and_what_is_allowed(tmp_path, provoke, error, fragments):
    with pytest.raises((Exception, SystemExit)) as raised:
        provoke(tmp_path)
    exc = raised.value
    message = str(exc)
    assert not isinstance(exc, RAW_ERRORS), f"raw {type(exc).__name__} reached the user: {message}"
    assert type(exc) is error or (error is FileNotFoundError and isinstance(exc, FileNotFoundError)), \
        f"expected {error.__name__}, got {type(exc).__name__}: {message}"
    for fragment in fragments:
        if fragment is str:  # the test folder itself
            fragment = str(tmp_path)
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert "weights_only=False" not in message


def test_the_catalogue_has_45_distinct_cases():
    ids = [case.id for case in CASES]
    assert len(ids) >= 45 and len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]


@pytest.mark.parametrize("command", ["train", "optimize", "export", "benchmark", "sensitivity", "oneshot"])
def test_every_command_refuses_an_unknown_flag_by_name(command, capsys):
    """Every command parses through HfArgumentParser: a typo fails before any work, naming the flag."""
    from hf_prune.commands import COMMANDS

    assert command in COMMANDS
    positional = {"export": ["checkpoint", "out"], "benchmark": ["checkpoint"]}.get(command, [])
    with pytest.raises(SystemExit) as raised:
        main([command, *positional, "--max_stepz", "3"])
    assert raised.value.code == 2 and "--max_stepz" in str(raised.value)
