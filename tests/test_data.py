"""hf_prune.data: labelled splits from local files, ready splits or the Hub (mocked: no download); labels read from
the data; seeded carving of missing splits; every data error names the option and the value."""

from __future__ import annotations

import json

import datasets
import pytest

from hf_prune.data import DataArguments, load_classification_data, load_raw_splits, prepare_data

from conftest import tiny_tokenizer, write_csv

WORDS = ["good day", "bad food", "great service", "awful day", "not good", "very bad", "the food", "good service"]


def rows(n, labels=("positive", "negative")):
    return [(WORDS[i % len(WORDS)], labels[i % len(labels)]) for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_string_labels_are_sorted_and_a_missing_test_split_is_carved_with_the_seed(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(40, ("positive", "negative", "neutral")))
    data = load_classification_data(DataArguments(train_file=train))
    assert data.label_names == ["negative", "neutral", "positive"]
    assert data.text_columns == ["text"]
    assert data.num_examples() == {"train": 36, "test": 4}
    assert data.sources["test"] == f"10% of train_file {train}, seed 42"
    assert data.description == (f"train: train_file {train} less the rows carved out for test; validation: none; "
                                f"test: 10% of train_file {train}, seed 42")
    again = load_classification_data(DataArguments(train_file=train))
    assert again.texts["test"]["text"] == data.texts["test"]["text"]
    other = load_classification_data(DataArguments(train_file=train, split_seed=1, test_size=8))
    assert other.num_examples()["test"] == 8 and other.sources["test"].startswith("8 rows of train_file")
    assert data.label_config() == {"num_labels": 3, "id2label": {0: "negative", 1: "neutral", 2: "positive"},
                                   "label2id": {"negative": 0, "neutral": 1, "positive": 2}}


def test_test_rows_do_not_move_with_validation_size_or_max_train_samples(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(50))
    base = load_classification_data(DataArguments(train_file=train, test_size=0.2))
    more = load_classification_data(DataArguments(train_file=train, test_size=0.2, validation_size=5,
                                                  max_train_samples=7))
    assert more.texts["test"]["text"] == base.texts["test"]["text"] and more.labels["test"] == base.labels["test"]
    assert more.num_examples() == {"train": 7, "validation": 5, "test": 10}
    assert "first 7 rows (--max_train_samples)" in more.sources["train"]
    assert more.sources["validation"] == f"5 rows of train_file {train} (less test), seed 42"
    # The benchmark loads only the test split: the same rows as the job's.
    bench = load_raw_splits(DataArguments(train_file=train, test_size=0.2), need=("test",))
    assert bench["test"]["text"] == base.texts["test"]["text"] and list(bench.splits) == ["test"]


def test_integer_labels_are_kept_when_0_to_n_minus_1_and_mapped_otherwise(tmp_path):
    records = [{"sentence1": a, "sentence2": b, "label": y} for a, b, y in
               [("good day", "great day", 1), ("bad food", "good food", 0), ("the day", "the food", 2)] * 4]
    data = load_classification_data(DataArguments(train_file=write_jsonl(tmp_path / "pairs.jsonl", records),
                                                  test_file=write_jsonl(tmp_path / "test.jsonl", records[:3])))
    assert data.text_columns == ["sentence1", "sentence2"]
    assert data.label_names == ["0", "1", "2"] and data.labels["test"] == [1, 0, 2]
    stars = [{"review": WORDS[i % 8], "stars": [1, 3, 5][i % 3]} for i in range(12)]
    data = load_classification_data(DataArguments(train_file=write_jsonl(tmp_path / "stars.jsonl", stars),
                                                  text_columns="review", label_column="stars", test_size=3))
    assert data.label_names == ["1", "3", "5"]
    assert sorted(set(data.labels["train"])) == [0, 1, 2]


def test_class_label_names_are_kept_and_splits_map_by_name():
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_dict({"sentence": ["good", "bad", "great"], "label": [1, 0, 1]}, features=features)
    test = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": ["pos", "neg"]})  # names as strings
    data = load_classification_data(DataArguments(), splits={"train": train, "test": test}, sources="my splits")
    assert data.label_names == ["neg", "pos"] and data.labels == {"train": [1, 0, 1], "test": [1, 0]}
    assert data.description == "train: my splits (train split); validation: none; test: my splits (test split)"
    with pytest.raises(ValueError, match=r"The test split \(my splits \(test split\)\) has no rows"):
        load_classification_data(DataArguments(), splits={"train": train, "test": test.select([])}, sources="my splits")


def test_prepare_data_tokenizes_to_max_length_with_labels(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    train = write_csv(tmp_path / "train.csv", rows(20))
    valid = write_csv(tmp_path / "valid.csv", rows(4))
    prepared = prepare_data(DataArguments(train_file=train, validation_file=valid, test_size=0.25), tokenizer,
                            max_length=8)
    assert prepared.label_names == ["negative", "positive"]
    assert len(prepared.train) == 15 and len(prepared.validation) == 4 and len(prepared.test) == 5
    assert set(prepared.train.column_names) >= {"input_ids", "attention_mask", "label"}
    assert all(len(ids) == 8 for ids in prepared.train["input_ids"])
    assert prepared.validation["label"] == [1, 0, 1, 0]
    assert f"validation: validation_file {valid}" in prepared.description


def test_hub_dataset_is_routed_to_load_dataset(monkeypatch):
    calls = []
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": WORDS, "label": [1, 0] * 4}, features=features),
        "validation": datasets.Dataset.from_dict({"sentence": WORDS[:4], "label": [1, 0, 1, 0]}, features=features),
        "test": datasets.Dataset.from_dict({"sentence": WORDS[:2], "label": [-1, -1]}, features=features),
    })

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(ValueError, match=r"--label_column 'label': label -1 .*test split.*--test_split_name validation"):
        load_classification_data(DataArguments(dataset_name="glue", dataset_config_name="sst2"))
    data = load_classification_data(DataArguments(dataset_name="glue", dataset_config_name="sst2",
                                                  test_split_name="validation", max_eval_samples=3))
    assert calls == [("glue", "sst2"), ("glue", "sst2")]
    assert data.label_names == ["negative", "positive"] and data.text_columns == ["sentence"]
    assert data.sources["test"] == "split 'validation' of glue/sst2, first 3 rows (--max_eval_samples)"
    assert data.sources["validation"].startswith("split 'validation' of glue/sst2")
    with pytest.raises(ValueError, match=r"--test_split_name 'test_matched'.*\['test', 'train', 'validation'\]"):
        load_classification_data(DataArguments(dataset_name="glue", test_split_name="test_matched"))


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: dict(train_file=str(d / "missing.csv")), r"--train_file '.*missing\.csv' does not exist"),
        (lambda d: dict(train_file=str(d / "train.xlsx")), r"--train_file '.*train\.xlsx' has an unsupported extension"),
        (lambda d: dict(train_file=d["train.csv"], text_columns="review"),
         r"--text_columns 'review': no such column .*\['text', 'label'\]"),
        (lambda d: dict(train_file=d["train.csv"], label_column="stars"),
         r"--label_column 'stars': no such column .*\['text', 'label'\]"),
        (lambda d: dict(train_file=d["one_class.csv"]), r"--label_column 'label' has a single class \('positive'\)"),
        (lambda d: dict(train_file=d["train.csv"], test_file=d["empty.csv"]), r"--test_file '.*empty\.csv' has no rows"),
        (lambda d: dict(train_file=d["train.csv"], test_file=d["unseen.csv"]),
         r"--label_column 'label': label 'neutral' in row 1 of the test split .*\['negative', 'positive'\]"),
        (lambda d: dict(train_file=d["review.csv"]), r"no `text`, `sentence` .* \['review', 'label'\].*--text_columns"),
        (lambda d: dict(train_file=d["train.csv"], text_columns="a,b,c"), r"--text_columns 'a,b,c' is invalid"),
        (lambda d: dict(train_file=d["train.csv"], max_train_samples=0), r"--max_train_samples 0 is invalid"),
        (lambda d: dict(train_file=d["train.csv"], test_size=1.5), r"--test_size 1.5 is invalid"),
        (lambda d: dict(train_file=d["train.csv"], test_size=40), r"--test_size 40 cannot be carved from the 20"),
        (lambda d: dict(dataset_name="imdb", train_file=d["train.csv"]), r"--dataset_name 'imdb' and --train_file"),
        (lambda d: dict(test_file=d["train.csv"]), r"No training data"),
        (lambda d: dict(train_file=d["none_text.csv"]), r"--text_columns 'text': row 1 of the train split .* None"),
        (lambda d: dict(train_file=d["float.csv"]), r"--label_column 'label': row 0 .* 0\.5, which is not a class"),
    ],
    ids=["missing-file", "extension", "text-column", "label-column", "one-class", "empty-split", "unseen-label",
         "no-default-text-column", "three-text-columns", "max-train-samples", "test-size", "carve-too-many",
         "hub-and-file", "no-train", "empty-text", "regression-labels"],
)
def test_data_errors_name_the_option_and_the_value(tmp_path, make_args, message):
    class Files(dict):
        def __truediv__(self, name):
            return tmp_path / name

    files = Files(
        {"train.csv": write_csv(tmp_path / "train.csv", rows(20)),
         "one_class.csv": write_csv(tmp_path / "one_class.csv", rows(6, ("positive",))),
         "empty.csv": write_csv(tmp_path / "empty.csv", []),
         "unseen.csv": write_csv(tmp_path / "unseen.csv", [("good day", "positive"), ("the day", "neutral")]),
         "review.csv": write_csv(tmp_path / "review.csv", rows(6), header=("review", "label")),
         "none_text.csv": write_csv(tmp_path / "none_text.csv", [("good", "positive"), ("", "negative")] * 3),
         "float.csv": write_csv(tmp_path / "float.csv", [("good", 0.5), ("bad", 1.5)] * 3)}
    )
    (tmp_path / "train.xlsx").write_text("not a spreadsheet")
    with pytest.raises(ValueError, match=message):
        load_classification_data(DataArguments(**make_args(files)))
