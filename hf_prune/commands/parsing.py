"""What every `hf-prune` command parses with: `HfArgumentParser` over its dataclasses, an optional `--config` YAML
file whose values become defaults, and flags that override it.

Defaults live on the dataclasses (`with_defaults` re-declares a base class's fields with a command's defaults, as
trl's `SFTConfig` does for `TrainingArguments`), so the Python API, `--help` and YAML configs agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from transformers import HfArgumentParser

PACKAGED_DATA_HELP = (
    "Hub dataset id, loaded with datasets.load_dataset (e.g. imdb, or glue with --dataset_config_name sst2). Give "
    "this or local files, not both (default: when neither --dataset_name nor --train_file is given, the packaged "
    "tweet-sentiment data in its fixed split: seed 42, 2000 test and 1000 validation rows)."
)


@dataclass
class ModelArguments:
    """The model a command works on, every command's first option; each command words its help (`CommandParser`'s
    `helps`)."""

    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Model folder or Hub id."})


def with_defaults(base: type, defaults: Mapping[str, Any], helps: Optional[Mapping[str, str]] = None) -> type:
    """A dataclass deriving from `base` whose fields named in `defaults` default to those values (help texts from
    `helps`, else the base's); types, other fields and `__post_init__` are the base's."""
    # Resolved types: a base declared under `from __future__ import annotations` holds strings that only its own
    # module can evaluate.
    hints, fields = typing.get_type_hints(base), []
    for name, value in defaults.items():
        parent = base.__dataclass_fields__[name]
        metadata = {**parent.metadata, **({"help": helps[name]} if helps and name in helps else {})}
        default = (dataclasses.field(default_factory=lambda v=value: list(v), metadata=metadata)
                   if isinstance(value, list) else dataclasses.field(default=value, metadata=metadata))
        fields.append((name, hints[name], default))
    return dataclasses.make_dataclass(base.__name__, fields, bases=(base,))


def subset(base: type, name: str, names: Sequence[str], helps: Optional[Mapping[str, str]] = None) -> type:
    """A dataclass of `base`'s fields `names` only (same types, defaults and help unless `helps` rewords it): a
    command that takes part of another dataclass's options, without restating their defaults."""
    hints, fields = typing.get_type_hints(base), []
    for field_name in names:
        parent = base.__dataclass_fields__[field_name]
        metadata = {**parent.metadata, **({"help": helps[field_name]} if helps and field_name in helps else {})}
        if parent.default_factory is not dataclasses.MISSING:
            default = dataclasses.field(default_factory=parent.default_factory, metadata=metadata)
        else:
            default = dataclasses.field(default=parent.default, metadata=metadata)
        fields.append((field_name, hints[field_name], default))
    return dataclasses.make_dataclass(name, fields)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds `(default: ...)` to every option, except where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text:
            return text
        return super()._get_help_string(action)


class MessageInExit:
    """argparse prints a bad flag's message and raises a bare SystemExit(2): a caller of `main()` (a notebook, a
    test) gets no message in the exception. This one prints the same lines and carries the message as well."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        print(text, file=sys.stderr)
        exit_ = SystemExit(text)
        exit_.code = 2  # argparse's status for usage errors; str(exit_) stays the message, printed once (above)
        raise exit_


class ArgumentParser(MessageInExit, argparse.ArgumentParser):
    pass


class CommandParser(MessageInExit, HfArgumentParser):
    """The parser of one command: its dataclasses' options, `--config`, and `(default: ...)` on every option."""

    def __init__(self, classes: Sequence[type], *, helps: Optional[Mapping[str, str]] = None, **kwargs: Any):
        super().__init__(tuple(classes), formatter_class=HelpFormatter, **kwargs)
        self.add_argument("--config", default=None,
                          help="YAML file of options (any of the options below); command-line flags override it. "
                          "(default: none)")
        for action in self._actions:
            for option in action.option_strings:
                if option.startswith("--no_") and isinstance(action, argparse._StoreFalseAction):
                    positive = option[len("--no_"):]
                    action.help = f"Set {positive} to false (the opposite of --{positive}). (default: off)"
        for option, text in (helps or {}).items():
            self.set_help(option, text)

    def set_help(self, option: str, text: str) -> None:
        """Reword one option's help for this command (e.g. what its default means here)."""
        for action in self._actions:
            if option in action.option_strings:
                action.help = text

    def add_alias(self, option: str, alias: str) -> None:
        """Accept `alias` for `option` (an old or shorter name users have in their scripts)."""
        action = self._option_string_actions[option]
        action.option_strings.append(alias)
        self._option_string_actions[alias] = action


def read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise SystemExit(f"hf-prune: --config {path!r} does not exist.") from None
    except yaml.YAMLError as err:
        raise SystemExit(f"hf-prune: --config {path!r} is not valid YAML ({err}).") from None
    if not isinstance(data, dict):
        raise SystemExit(f"hf-prune: --config {path!r} must hold a mapping of option: value, got {type(data).__name__}.")
    return data


def init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_config_keys(values: dict, path: str, classes: Sequence[type], command: str) -> None:
    allowed = {name for cls in classes for name in init_fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SystemExit(f"hf-prune: unknown option(s) {', '.join(hints)} in {path}; a config file holds options of "
                         f"hf-prune {command} (see hf-prune {command} --help).")


def parse_command(argv: Sequence[str], classes: Sequence[type], make_parser: Callable[[], HfArgumentParser],
                  command: str, extras: Optional[dict] = None) -> list:
    """The dataclasses of a command from an optional `--config` YAML file overridden by command-line flags.

    `extras` receives the parsed values that belong to no dataclass (positional arguments).

    Raises:
        SystemExit: a bad --config file or an unknown flag.
        ValueError: a value one of the dataclasses refuses (naming the option).
    """
    pre = ArgumentParser(prog=f"hf-prune {command}", add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(list(argv))
    parser = make_parser()
    if known.config:
        values = read_yaml(known.config)
        check_config_keys(values, known.config, classes, command)
        parser.set_defaults(**values)  # --help then shows the file's values as the defaults
    namespace = vars(parser.parse_args(rest))
    namespace.pop("config", None)
    if extras is not None:
        owned = {name for cls in classes for name in init_fields(cls)}
        extras.update({k: v for k, v in namespace.items() if k not in owned})
    return [cls(**{name: namespace[name] for name in init_fields(cls) if name in namespace}) for cls in classes]


def packaged_splits(command: str):
    """The packaged tweet data in its fixed split (`hf_prune.recipes`), the default data of the classifier commands."""
    from ..recipes.packaged import job_splits

    try:
        return job_splits()
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(
            f"hf-prune {command}: no --dataset_name or --train_file given, and the packaged tweet data it falls back "
            f"to is unavailable ({err}). Pass your data with --train_file (csv/tsv/json/jsonl/parquet) or "
            "--dataset_name."
        ) from None


def packaged_model(command: str) -> str:
    from ..recipes.packaged import packaged_model_path

    try:
        return packaged_model_path()
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(
            f"hf-prune {command}: no --model_name_or_path given, and the packaged all-MiniLM-L6-v2 it falls back to "
            f"is unavailable ({err}). Pass --model_name_or_path (a model folder or Hub id)."
        ) from None


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (not the one at creation), so redirections
    made later (notebooks, pytest's capture) see the progress lines."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_progress(name: str) -> None:
    """Print a command's progress lines (`dense arm: fine-tuning ...`, logged on logger `name`) on stderr."""
    command_logger = logging.getLogger(name)
    if not any(getattr(h, "_hf_prune_cli", False) for h in command_logger.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("hf-prune: %(message)s"))
        handler._hf_prune_cli = True  # type: ignore[attr-defined]
        command_logger.addHandler(handler)
    command_logger.setLevel(logging.INFO)


def from_pretrained_option(auto_class: Any, path: str, option: str) -> Any:
    """`auto_class.from_pretrained(path)`, failing with the option's name: Transformers' own message for a missing
    folder is a Hub error about repo ids."""
    try:
        return auto_class.from_pretrained(path)
    except (OSError, ValueError) as err:  # HFValidationError is a ValueError; a missing file an OSError
        if os.path.exists(path) and not os.path.isdir(path):
            problem = "is a file, not a model folder"
        elif not os.path.isdir(path) and (path.count("/") > 1 or os.path.isabs(path) or path.startswith(".")):
            problem = "does not exist"
        else:
            problem = f"could not be loaded ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        raise ValueError(f"--{option} {path!r} {problem}: give a model folder (save_pretrained output) or a Hub "
                         "model id that is cached or reachable.") from None
