"""Every numeric option of every command, given a value out of range (a negative number), is refused before any
model is loaded, with a message that names the option and the value: the bad-input rule of tests/test_bad_inputs.py,
swept over all the commands' own options instead of listed one by one (TrainingArguments' are Transformers' own)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import transformers
from transformers import TrainingArguments

from hf_prune.commands import COMMANDS, command
from hf_prune.export import is_onnx_available

# Options for which a negative number is a valid value.
NEGATIVE_IS_VALID = {("oneshot", "seed"): "Python's random.Random takes any integer seed"}


def numeric_type(hint: typing.Any) -> typing.Optional[type]:
    """int or float for an option of that type, Optional of it or a list of it; None for any other option."""
    if hint in (int, float):
        return hint
    for arg in typing.get_args(hint):
        if arg in (int, float):
            return arg
        inner = typing.get_args(arg)
        if inner and inner[0] in (int, float):
            return inner[0]
    return None


def own_options() -> typing.Iterator[tuple[str, dataclasses.Field, typing.Any]]:
    """(command, field, type hint) of every option a command declares itself (TrainingArguments' are Transformers')."""
    for name in COMMANDS:
        for cls in command(name).make_parser().dataclass_types:
            if not issubclass(cls, TrainingArguments):
                hints = typing.get_type_hints(cls)
                yield from ((name, field, hints.get(field.name)) for field in dataclasses.fields(cls) if field.init)


def numeric_options() -> list[tuple[str, str, type]]:
    return [(name, field.name, numeric_type(hint)) for name, field, hint in own_options()
            if numeric_type(hint) is not None and (name, field.name) not in NEGATIVE_IS_VALID]


# Text options whose value can only be judged against what the run reads (the data's splits and columns, the model's
# module names, the filesystem): refused later, when that is read (tests/test_bad_inputs.py has their rows).
FREE_TEXT = {"output_dir", "test_split_name", "validation_split_name", "calibration_split", "evaluation_split",
             "dataset_config_name", "text_column", "targets", "exclude", "calibration_file", "evaluation_file",
             "names"}


def is_text(hint: typing.Any) -> bool:
    """str, Optional[str], Literal[...] (or Optional of it), list[str]."""
    if hint is str or typing.get_origin(hint) is typing.Literal:
        return True
    return any(arg is str or typing.get_origin(arg) is typing.Literal or typing.get_args(arg) == (str,)
               for arg in typing.get_args(hint))


def text_options() -> list[tuple[str, str]]:
    return [(name, field.name) for name, field, hint in own_options() if is_text(hint) and field.name not in FREE_TEXT]


class WorkStarted(RuntimeError):
    pass


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise WorkStarted("a model was loaded before the option was checked")

    # Every way to a model (from_pretrained, from_config, load_pruned's own) builds a PreTrainedModel.
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)


def test_the_sweep_covers_every_command():
    assert {name for name, _, _ in numeric_options()} == set(COMMANDS)
    assert {name for name, _ in text_options()} == set(COMMANDS)


def refused(name: str, option: str, value: str, classifier_dir: str, tmp_path) -> str:
    """The message `hf-prune NAME ... --OPTION VALUE` exits with (the other options valid)."""
    out = str(tmp_path / "out")
    text = str(tmp_path / "text.txt")
    (tmp_path / "text.txt").write_text("alpha beta gamma delta\n\nepsilon zeta eta theta\n", encoding="utf-8")
    required = {
        "optimize": ["--target_speedup", "2", "--model_name_or_path", classifier_dir, "--output_dir", out],
        "export": [classifier_dir, out],
        "benchmark": [classifier_dir, "--output_dir", out],
        "sensitivity": ["--model_name_or_path", classifier_dir, "--output_dir", out],
        # Its own text and model: without them oneshot reaches for the packaged SmolLM2 and corpus first.
        "oneshot": ["--model_name_or_path", classifier_dir, "--calibration_file", text, "--evaluation_file", text,
                    "--output_dir", out],
    }.get(name, ["--output_dir", out])
    if name == "oneshot" and option == "dataset_name":  # a Hub dataset instead of the files, not both
        required = ["--model_name_or_path", classifier_dir, "--output_dir", out]
    with pytest.raises(SystemExit) as exit_:
        command(name).main([*required, f"--{option}", value])
    message = str(exit_.value)
    if "the `onnx` extra" in message and not is_onnx_available():
        pytest.skip("refused earlier, for the missing onnx extra (the leg without it)")
    return message


@pytest.mark.parametrize("name, option, kind", numeric_options(), ids=lambda v: getattr(v, "__name__", v))
def test_a_negative_value_is_refused_naming_the_option_before_any_model_loads(name, option, kind, classifier_dir,
                                                                              tmp_path, no_model_loads):
    value = "-7" if kind is int else "-7.5"
    message = refused(name, option, value, classifier_dir, tmp_path)
    assert option in message and value in message, message


@pytest.mark.parametrize("name, option", text_options())
def test_a_value_outside_an_options_vocabulary_is_refused_naming_it_before_any_model_loads(name, option,
                                                                                          classifier_dir, tmp_path,
                                                                                          no_model_loads):
    # Methods, criteria, levels, tasks, devices, patterns, files, datasets, columns, models: "no-such-value" is
    # none of them.
    message = refused(name, option, "no-such-value", classifier_dir, tmp_path)
    assert option in message and "no-such-value" in message, message


def test_the_guard_stops_a_run_whose_options_are_valid(classifier_dir, tmp_path, no_model_loads):
    """Without the bad value the same command gets as far as building a model: the sweep's refusals come first."""
    with pytest.raises(WorkStarted):
        command("sensitivity").main(["--model_name_or_path", classifier_dir, "--output_dir", str(tmp_path / "out")])
