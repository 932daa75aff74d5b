"""Labelled text-classification data from the Hub or from local files: splits, labels, text columns, tokenization.

The data side of `hf-prune train` and `hf-prune benchmark`, in the manner of Transformers'
`examples/pytorch/text-classification/run_glue.py`, for any data set:

- a Hub dataset (`dataset_name`, `dataset_config_name`) or local files (`train_file`, `validation_file`,
  `test_file`: csv, tsv, json, jsonl or parquet), all loaded with `datasets.load_dataset`;
- one text column, or two for sentence pairs (`text_columns`; by default `text`, else `sentence`, else
  `sentence1` + `sentence2`), and a label column (`label_column`);
- a missing test split (and, on request, a validation split) carved from train with a seeded split
  (`test_size`, `validation_size`, `split_seed`); the test split is carved first, so its rows do not depend on
  `validation_size` or `max_train_samples`;
- labels read from the data: a `ClassLabel` feature gives its names; string labels are the sorted unique values of
  train; integer labels are kept when they are 0..n-1 and mapped to 0..n-1 otherwise; any number of classes.

Every problem (a missing file, an unknown column, a single class, a label of the test split that train never has,
an empty split) raises `ValueError` naming the option and the value, before any model is loaded.

    from hf_prune.data import DataArguments, prepare_data

    data = prepare_data(DataArguments(train_file="reviews.csv", text_columns="review", label_column="stars"),
                        tokenizer, max_length=128)
    data.train, data.validation, data.test, data.label_names, data.description
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional, Union

import datasets
import numpy as np

# File suffix -> `datasets.load_dataset` builder and its extra arguments.
DATA_FILE_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
# Text columns tried, in order, when `text_columns` is not given.
DEFAULT_TEXT_COLUMNS: tuple[tuple[str, ...], ...] = (("text",), ("sentence",), ("sentence1", "sentence2"))
SPLITS: tuple[str, ...] = ("train", "validation", "test")
_FILE_OPTIONS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


@dataclass
class DataArguments:
    """Where the labelled data comes from and how it is split, columned and cut. Every field is a command-line
    option of `hf-prune train` (and, for the data source and columns, of `hf-prune benchmark`)."""

    _argument_group_name = "data"  # HfArgumentParser groups these options under this title in --help
    # File suffixes the options accept; a command that reads other files (plain text) widens it.
    file_types: ClassVar[tuple[str, ...]] = tuple(DATA_FILE_TYPES)

    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Hub dataset id, loaded with datasets.load_dataset (e.g. imdb, or glue with "
                  "--dataset_config_name sst2). Give this or local files, not both."},
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Configuration of the Hub dataset (e.g. sst2 for glue)."}
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Training data: a .csv, .tsv, .json, .jsonl or .parquet file."}
    )
    validation_file: Optional[str] = field(
        default=None,
        metadata={"help": "Validation data (csv/tsv/json/jsonl/parquet), the Trainer's eval_dataset (used with "
                  "--eval_strategy steps/epoch). Without it and without a Hub validation split, validation_size "
                  "rows are carved from train (none when validation_size is 0)."},
    )
    test_file: Optional[str] = field(
        default=None,
        metadata={"help": "Test data (csv/tsv/json/jsonl/parquet) on which the final accuracy and macro-F1 are "
                  "scored. Without it and without a Hub test split, test_size rows are carved from train."},
    )
    text_columns: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Text column, or two comma-separated columns for sentence pairs (e.g. "
                  "question,sentence) (default: text, else sentence, else sentence1,sentence2, the first the data "
                  "has)."},
    )
    label_column: str = field(
        default="label",
        metadata={"help": "Column of class labels: strings, integers, or a ClassLabel feature (whose names are kept)."},
    )
    validation_split_name: str = field(
        default="validation",
        metadata={"help": "Split of the Hub dataset used as validation (e.g. validation_matched for glue/mnli)."},
    )
    test_split_name: str = field(
        default="test",
        metadata={"help": "Split of the Hub dataset scored as test. GLUE's test splits have no labels: use "
                  "validation there."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training rows (after any split is carved off)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N rows of the validation and of the test split."}
    )
    max_length: int = field(
        default=128, metadata={"help": "Tokens per example: longer texts are truncated, shorter ones padded."}
    )
    validation_size: float = field(
        default=0.0,
        metadata={"help": "Validation rows carved from train when there is no validation split: a fraction in (0, 1) "
                  "or a row count (0: no validation split)."},
    )
    test_size: float = field(
        default=0.1,
        metadata={"help": "Test rows carved from train when there is no test split: a fraction in (0, 1) or a row "
                  "count."},
    )
    split_seed: int = field(
        default=42, metadata={"help": "Seed of the split that carves test (then validation) rows from train."}
    )

    def __post_init__(self) -> None:
        self.text_columns = parse_text_columns(self.text_columns)
        if not self.label_column:
            raise ValueError("--label_column is empty: name the column that holds the labels.")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) \
                or not 0 <= self.split_seed < 2**32:
            raise ValueError(f"--split_seed {self.split_seed!r} is invalid: a whole number in [0, 2**32) (the "
                             "shuffle that carves the splits takes no other).")
        if self.text_columns and self.label_column in self.text_columns:
            raise ValueError(f"--label_column {self.label_column!r} is also one of --text_columns {self.text_columns}.")
        files = {option: getattr(self, option) for option in _FILE_OPTIONS.values() if getattr(self, option)}
        if self.dataset_name and files:
            given = ", ".join(f"--{option} {path!r}" for option, path in files.items())
            raise ValueError(f"--dataset_name {self.dataset_name!r} and {given}: give a Hub dataset or local files, "
                             "not both.")
        if self.dataset_config_name and not self.dataset_name:
            raise ValueError(f"--dataset_config_name {self.dataset_config_name!r} needs --dataset_name.")
        for option, path in files.items():
            check_data_file(path, option, self.file_types)
        for option in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{option} {value!r} is invalid: give a positive number of rows.")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"--max_length {self.max_length!r} is invalid: give a positive number of tokens.")
        for option in ("validation_size", "test_size"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                value >= 1 and not float(value).is_integer()
            ):
                raise ValueError(f"--{option} {value!r} is invalid: give a fraction in (0, 1) or a whole number of "
                                 "rows (0: none).")
        for option in ("validation_split_name", "test_split_name"):
            if not getattr(self, option):
                raise ValueError(f"--{option} is empty: name a split of the Hub dataset.")

    @property
    def has_source(self) -> bool:
        """Whether a data source is given (a Hub dataset or at least one file)."""
        return bool(self.dataset_name or self.train_file or self.validation_file or self.test_file)


def parse_text_columns(value: Union[None, str, Sequence[str]], option: str = "text_columns") -> Optional[list[str]]:
    """`"a"`, `"a,b"`, `["a", "b"]` or `["a,b"]` -> `["a"]` / `["a", "b"]`; None stays None."""
    if value is None:
        return None
    parts = [value] if isinstance(value, str) else list(value)
    columns = [c.strip() for part in parts for c in str(part).split(",")]
    if len(columns) not in (1, 2) or not all(columns):
        raise ValueError(f"--{option} {value!r} is invalid: name one column, or two comma-separated columns for "
                         "sentence pairs.")
    return columns


def check_data_file(path: str, option: str, file_types: Iterable[str] = tuple(DATA_FILE_TYPES)) -> None:
    """Raise `ValueError` naming `option` if `path` has a suffix not in `file_types` or does not exist."""
    file_types = tuple(file_types)
    if Path(path).suffix.lower() not in file_types:
        raise ValueError(f"--{option} {path!r} has an unsupported extension: give a {'/'.join(file_types)} file.")
    if not os.path.isfile(path):
        raise ValueError(f"--{option} {path!r} does not exist.")


def load_data_file(path: str, option: str = "train_file") -> datasets.Dataset:
    """One .csv, .tsv, .json, .jsonl or .parquet file as a `datasets.Dataset` (through `datasets.load_dataset`)."""
    check_data_file(path, option)
    builder, kwargs = DATA_FILE_TYPES[Path(path).suffix.lower()]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # malformed file: the datasets error is long; say which option it came from
        if "corresponds to no data" in str(err):  # a header and no rows
            raise ValueError(f"--{option} {path!r} has no rows.") from err
        raise ValueError(f"--{option} {path!r} could not be read as {builder}: {type(err).__name__}: {err}") from err


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide the `datasets` map bars for a moment and restore the setting."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


# ------------------------------------------------------------------------------------------------ columns
def resolve_text_columns(dataset: datasets.Dataset, text_columns: Optional[Sequence[str]],
                         where: str = "the data") -> list[str]:
    """The text column(s) to use: `text_columns` if they all exist, else the first of `DEFAULT_TEXT_COLUMNS`."""
    columns = list(dataset.column_names)
    if text_columns is None:
        for candidate in DEFAULT_TEXT_COLUMNS:
            if set(candidate) <= set(columns):
                return list(candidate)
        raise ValueError(f"{where} has no `text`, `sentence` or `sentence1`/`sentence2` column (its columns are "
                         f"{columns}); name the text column(s) with --text_columns.")
    missing = [c for c in text_columns if c not in columns]
    if missing:
        raise ValueError(f"--text_columns {missing if len(missing) > 1 else missing[0]!r}: no such column in {where}; "
                         f"its columns are {columns}.")
    return list(text_columns)


def check_label_column(dataset: datasets.Dataset, label_column: str, where: str = "the data") -> None:
    if label_column not in dataset.column_names:
        raise ValueError(f"--label_column {label_column!r}: no such column in {where}; its columns are "
                         f"{list(dataset.column_names)}.")


def class_value(value: Any) -> Union[str, int, None]:
    """A label as a class: strings stay, integers (and whole floats, and bools) become int; anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return None


# ------------------------------------------------------------------------------------------------ splits
@dataclass
class RawSplits:
    """Splits as loaded (all columns, labels as in the data), and where each came from."""

    splits: dict[str, Optional[datasets.Dataset]]
    sources: dict[str, str]

    def __getitem__(self, split: str) -> Optional[datasets.Dataset]:
        return self.splits.get(split)


def _hub_name(args: DataArguments) -> str:
    return args.dataset_name + (f"/{args.dataset_config_name}" if args.dataset_config_name else "")


def _load_hub(args: DataArguments) -> tuple[dict[str, Optional[datasets.Dataset]], dict[str, str]]:
    config = f" --dataset_config_name {args.dataset_config_name!r}" if args.dataset_config_name else ""
    try:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as err:
        raise ValueError(f"--dataset_name {args.dataset_name!r}{config} could not be loaded with "
                         f"datasets.load_dataset: {type(err).__name__}: {err}") from err
    if not isinstance(loaded, Mapping):
        raise ValueError(f"--dataset_name {args.dataset_name!r}{config} did not load as a dataset with splits.")
    names = {"train": "train", "validation": args.validation_split_name, "test": args.test_split_name}
    for split, option in (("validation", "validation_split_name"), ("test", "test_split_name")):
        default = DataArguments.__dataclass_fields__[option].default
        if names[split] != default and names[split] not in loaded:
            raise ValueError(f"--{option} {names[split]!r}: --dataset_name {_hub_name(args)!r} has no such split; "
                             f"its splits are {sorted(loaded)}.")
    splits = {split: loaded[name] if name in loaded else None for split, name in names.items()}
    sources = {split: f"split {names[split]!r} of {_hub_name(args)}" for split in SPLITS if splits[split] is not None}
    return splits, sources


def _size_text(size: float) -> str:
    return f"{size:.0%}" if 0 < size < 1 else f"{int(size)} rows"


def _carve(train: datasets.Dataset, size: float, option: str, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, carved): `size` rows (a fraction, rounded up, or a count) drawn with a seeded permutation; both keep
    the file order."""
    n = len(train)
    count = math.ceil(size * n) if 0 < size < 1 else int(size)
    if not 1 <= count < n:
        raise ValueError(f"--{option} {size!r} cannot be carved from the {n} training rows: it gives {count} rows, "
                         f"and both parts need at least one.")
    order = np.random.default_rng(seed).permutation(n)
    carved, rest = np.sort(order[:count]), np.sort(order[count:])
    return train.select(rest, keep_in_memory=True), train.select(carved, keep_in_memory=True)


def load_raw_splits(
    args: DataArguments,
    splits: Optional[Mapping[str, datasets.Dataset]] = None,
    sources: Union[None, str, Mapping[str, str]] = None,
    need: Sequence[str] = SPLITS,
) -> RawSplits:
    """Load the splits in `need` (carving a missing test, and validation if asked, from train), cut them to
    `max_*_samples`, and check the text and label columns exist.

    Args:
        args: the data options.
        splits: ready splits (`{"train": ..., "validation": ..., "test": ...}`, e.g. a `DatasetDict`) used instead of
            `args.dataset_name` / the files; missing ones are carved from train as for files.
        sources: where `splits` came from, for the description (one text for all, or one per split).
        need: the splits wanted; "validation" is optional (only loaded or carved when available or asked for).
    """
    need = [s for s in SPLITS if s in need]
    if splits is not None:
        if args.has_source:
            raise ValueError("Give the data once: ready splits, or a data source in DataArguments, not both.")
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"Unknown split name(s) {unknown}: use {list(SPLITS)}.")
        loaded = {s: splits.get(s) for s in SPLITS}
        if isinstance(sources, Mapping):
            described = {s: str(sources.get(s, "given splits")) for s in SPLITS if loaded[s] is not None}
        else:
            described = {s: f"{sources or 'given splits'} ({s} split)" for s in SPLITS if loaded[s] is not None}
    elif args.dataset_name:
        loaded, described = _load_hub(args)
    else:
        loaded, described = {}, {}
        for split, option in _FILE_OPTIONS.items():
            path = getattr(args, option)
            if path and (split in need or (split == "train" and "test" in need and not args.test_file)):
                loaded[split] = load_data_file(path, option)
                described[split] = f"{option} {path}"
        if not loaded:
            wanted = " or ".join(f"--{_FILE_OPTIONS[s]}" for s in need)
            raise ValueError(f"No data given: pass --dataset_name, or {wanted}.")

    source_of_train = described.get("train", "train")
    if "train" in need and loaded.get("train") is None:
        where = f"--dataset_name {_hub_name(args)!r} (splits {sorted(s for s in loaded if loaded[s] is not None)})" \
            if args.dataset_name else "the given data"
        raise ValueError(f"No training data in {where}: give --train_file or --dataset_name with a train split.")
    carved: list[str] = []
    if "test" in need and loaded.get("test") is None:
        if loaded.get("train") is None:
            raise ValueError("No test data: give --test_file, or --train_file / --dataset_name to carve it from.")
        if args.test_size == 0:
            raise ValueError(f"--test_size 0 but there is no test split in {source_of_train}: give --test_file or a "
                             "positive --test_size.")
        loaded["train"], loaded["test"] = _carve(loaded["train"], args.test_size, "test_size", args.split_seed)
        described["test"] = f"{_size_text(args.test_size)} of {source_of_train}, seed {args.split_seed}"
        carved.append("test")
    if "validation" in need and loaded.get("validation") is None and args.validation_size > 0:
        if loaded.get("train") is None:
            raise ValueError("No validation data: give --validation_file, or training data to carve it from.")
        loaded["train"], loaded["validation"] = _carve(loaded["train"], args.validation_size, "validation_size",
                                                       args.split_seed)
        described["validation"] = f"{_size_text(args.validation_size)} of {source_of_train} (less test), seed " \
                                  f"{args.split_seed}"
        carved.append("validation")
    if carved and "train" in need:
        described["train"] = f"{source_of_train} less the rows carved out for {' and '.join(carved)}"

    result: dict[str, Optional[datasets.Dataset]] = {}
    for split in need:
        dataset = loaded.get(split)
        if dataset is None:
            continue
        cap = args.max_train_samples if split == "train" else args.max_eval_samples
        if cap is not None and len(dataset) > cap:
            dataset = dataset.select(range(cap), keep_in_memory=True)
            option = "max_train_samples" if split == "train" else "max_eval_samples"
            described[split] += f", first {cap} rows (--{option})"
        if len(dataset) == 0:
            raise ValueError(f"The {split} split ({described[split]}) has no rows.")
        result[split] = dataset
    sources_out = {s: described[s] for s in SPLITS if result.get(s) is not None}
    return RawSplits(splits={s: result.get(s) for s in need}, sources=sources_out)


# ------------------------------------------------------------------------------------------------ labels
def _label_values(dataset: datasets.Dataset, column: str) -> tuple[list[Any], Optional[datasets.ClassLabel]]:
    feature = dataset.features[column]
    return list(dataset[column]), feature if isinstance(feature, datasets.ClassLabel) else None


def _no_label_hint(value: Any, names: Optional[list[str]]) -> str:
    if value == -1 and names is not None:
        return (" (-1 means 'no label' in datasets: GLUE-style test splits carry none; score another split with "
                "--test_split_name validation, or give --test_file)")
    return ""


def infer_labels(dataset: datasets.Dataset, column: str, where: str) -> tuple[list[str], dict[Any, int], list[int]]:
    """Label names, a value -> id map and the ids of `dataset` (the training split), read from its labels.

    A ClassLabel feature gives its names (ids kept); string labels give their sorted unique values; integer labels
    are kept when they are 0..n-1, else mapped in sorted order. Fewer than two classes is an error.
    """
    values, class_label = _label_values(dataset, column)
    if class_label is not None:
        names = list(class_label.names)
        for row, value in enumerate(values):
            if value is None or not 0 <= value < len(names):
                raise ValueError(f"--label_column {column!r}: label {value!r} in row {row} of {where} is not one of "
                                 f"its {len(names)} classes {names}{_no_label_hint(value, names)}.")
        mapping: dict[Any, int] = {name: i for i, name in enumerate(names)}
        mapping.update({i: i for i in range(len(names))})
        ids = [int(v) for v in values]
        present = sorted(set(ids))
        if len(present) < 2:
            raise ValueError(f"--label_column {column!r} has a single class ({names[present[0]]!r}) in {where}; "
                             "classification needs at least two.")
        return names, mapping, ids
    keys = []
    for row, value in enumerate(values):
        key = class_value(value)
        if key is None:
            raise ValueError(f"--label_column {column!r}: row {row} of {where} has the label {value!r}, which is not "
                             "a class (a string or a whole number); only classification labels are supported.")
        keys.append(key)
    unique = set(keys)
    if len(unique) < 2:
        raise ValueError(f"--label_column {column!r} has a single class ({next(iter(unique), None)!r}) in {where}; "
                         "classification needs at least two.")
    if all(isinstance(k, int) for k in unique):
        ordered = sorted(unique)
        names = [str(k) for k in ordered]
        mapping = {k: i for i, k in enumerate(ordered)}  # identity when the labels are already 0..n-1
    else:
        keys = [str(k) for k in keys]  # a mix of numbers and words: all are names
        names = sorted(set(keys))
        mapping = {k: i for i, k in enumerate(names)}
    return names, mapping, [mapping[k] for k in keys]


def encode_labels(dataset: datasets.Dataset, column: str, names: list[str], mapping: Mapping[Any, int],
                  where: str) -> list[int]:
    """Ids of the labels of a validation/test split under the training labels; an unseen label is an error."""
    values, class_label = _label_values(dataset, column)
    ids = []
    for row, value in enumerate(values):
        key = value
        if class_label is not None and isinstance(value, int) and 0 <= value < len(class_label.names):
            key = class_label.names[value]
        key = class_value(key)
        if key in mapping:
            ids.append(mapping[key])
        elif isinstance(key, int) and str(key) in mapping:
            ids.append(mapping[str(key)])
        elif isinstance(key, str) and key.strip().lstrip("-").isdigit() and int(key) in mapping:
            ids.append(mapping[int(key)])
        else:
            hint = _no_label_hint(value, names if class_label is not None or value == -1 else None)
            raise ValueError(f"--label_column {column!r}: label {value!r} in row {row} of {where} does not occur in "
                             f"the training data, whose labels are {names}{hint}.")
    return ids


def _check_texts(dataset: datasets.Dataset, columns: Sequence[str], where: str) -> None:
    for column in columns:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string") and \
                dataset.data.column(column).null_count == 0:
            continue  # the common case, checked without reading the rows
        for row, text in enumerate(dataset[column]):
            if not isinstance(text, str):
                raise ValueError(f"--text_columns {column!r}: row {row} of {where} holds {text!r}, not a text.")


# ------------------------------------------------------------------------------------------------ prepared data
@dataclass
class ClassificationData:
    """Labelled splits ready for a classifier: text columns and ids in 0..num_labels-1, and where each came from.

    `train` and `test` are present whenever they were asked for; `validation` may be None.
    """

    texts: dict[str, datasets.Dataset]  # split -> dataset of the text column(s) only
    labels: dict[str, list[int]]  # split -> class ids
    label_names: list[str]
    text_columns: list[str]
    sources: dict[str, str]

    @property
    def description(self) -> str:
        """Where each split came from, on one line, e.g. `train: train_file a.csv ...; test: 10% of ..., seed 42`."""
        return "; ".join(f"{split}: {self.sources.get(split, 'none')}" for split in SPLITS)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def label_config(self) -> dict[str, Any]:
        """`num_labels`, `id2label` and `label2id` for `from_pretrained` / the model config."""
        return {"num_labels": self.num_labels, "id2label": dict(enumerate(self.label_names)),
                "label2id": {name: i for i, name in enumerate(self.label_names)}}

    def num_examples(self) -> dict[str, int]:
        return {split: len(ids) for split, ids in self.labels.items()}

    def tokenize(self, tokenizer: Any, max_length: int) -> datasets.DatasetDict:
        """`input_ids` (padded to `max_length`, so the default collator stacks them), `attention_mask` (and
        `token_type_ids` where the tokenizer makes them) and `label`, per split; kept in memory."""
        columns = self.text_columns

        def encode(batch: dict[str, list[Any]]) -> Any:
            return tokenizer(*[batch[c] for c in columns], padding="max_length", truncation=True,
                             max_length=max_length)

        out = {}
        with quiet_progress_bars():
            for split, dataset in self.texts.items():
                encoded = dataset.map(encode, batched=True, remove_columns=list(dataset.column_names),
                                      keep_in_memory=True)
                out[split] = encoded.add_column("label", self.labels[split])
        return datasets.DatasetDict(out)


def load_classification_data(
    args: DataArguments,
    splits: Optional[Mapping[str, datasets.Dataset]] = None,
    sources: Union[None, str, Mapping[str, str]] = None,
) -> ClassificationData:
    """Train, validation (if any) and test splits with their labels read from the training data, checked.

    Raises:
        ValueError: naming the option and the value, for every problem with the data (see the module docstring).
    """
    raw = load_raw_splits(args, splits, sources)
    where = {split: f"the {split} split ({raw.sources[split]})" for split in raw.sources}
    train = raw["train"]
    columns = resolve_text_columns(train, args.text_columns, where["train"])
    if args.label_column in columns:
        raise ValueError(f"--label_column {args.label_column!r} is also a text column {columns}.")
    texts, labels = {}, {}
    for split, dataset in raw.splits.items():
        if dataset is None:
            continue
        resolve_text_columns(dataset, columns, where[split])
        check_label_column(dataset, args.label_column, where[split])
        _check_texts(dataset, columns, where[split])
    names, mapping, labels["train"] = infer_labels(train, args.label_column, where["train"])
    for split, dataset in raw.splits.items():
        if dataset is None:
            continue
        if split != "train":
            labels[split] = encode_labels(dataset, args.label_column, names, mapping, where[split])
        texts[split] = dataset.select_columns(columns)
    return ClassificationData(texts=texts, labels=labels, label_names=names, text_columns=columns,
                              sources=dict(raw.sources))


@dataclass
class PreparedData:
    """What `prepare_data` returns: tokenized splits, label names and where the data came from."""

    train: datasets.Dataset
    validation: Optional[datasets.Dataset]
    test: datasets.Dataset
    label_names: list[str]
    description: str
    data: ClassificationData


def prepare_data(
    args: DataArguments,
    tokenizer: Any,
    max_length: Optional[int] = None,
    splits: Optional[Mapping[str, datasets.Dataset]] = None,
    sources: Union[None, str, Mapping[str, str]] = None,
) -> PreparedData:
    """Load, check and tokenize the data: train/validation/test (validation may be None), the label names and a
    one-line description of where each split came from (e.g. `test: 10% of train_file a.csv, seed 42`)."""
    data = load_classification_data(args, splits, sources)
    tokenized = data.tokenize(tokenizer, max_length or args.max_length)
    return PreparedData(train=tokenized["train"], validation=tokenized.get("validation"), test=tokenized["test"],
                        label_names=data.label_names, description=data.description, data=data)
