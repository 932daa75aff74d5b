"""`hf-prune train` on your own model and data (hf_prune.commands.job): tiny BERT saved to a folder, small CSV / JSON Lines
files, a few steps per arm. Labels, data description and both arms in results.json; TrainingArguments flags passed
through; every data error raised before a model is loaded; the Hub path through a mocked `datasets.load_dataset`."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch
import transformers

from hf_prune.cli import main
from hf_prune.commands.train import parse_args as parse_train_args
from hf_prune.commands.job import JobData, arm_training_arguments

from conftest import WORDS, tiny_bert, tiny_tokenizer, write_csv


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny pretrained BERT encoder (no classification head, 64 positions) and its WordPiece tokenizer in one
    folder, as from save_pretrained: what a Hub base model looks like."""
    root = tmp_path_factory.mktemp("tiny_model")
    tokenizer = tiny_tokenizer(root)
    tiny_bert(vocab_size=tokenizer.vocab_size).bert.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def texts(n, seed=0, words=4):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def labelled(n, labels, seed=0):
    return [(t, labels[i % len(labels)]) for i, t in enumerate(texts(n, seed))]


def tiny_run(model_dir, out, *extra):
    """`hf-prune train` arguments for a run of seconds: 4 steps of 8 examples per arm, 16 tokens, CPU."""
    return ["train", "--model_name_or_path", model_dir, "--output_dir", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "8", "--max_length", "16", "--logging_steps", "1", "--use_cpu",
            "--disable_tqdm", "true", "--pruning_interval", "1", *extra]


def training_args_of(folder):
    return torch.load(folder / "training_args.bin", weights_only=False)


def test_train_on_a_csv_with_string_labels(model_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", labelled(40, ["positive", "negative"]))
    valid = write_csv(tmp_path / "valid.csv", labelled(8, ["negative", "positive"], seed=1))
    test = write_csv(tmp_path / "test.csv", labelled(10, ["negative", "positive"], seed=2))
    out = tmp_path / "out"
    assert main(tiny_run(model_dir, out, "--train_file", train, "--validation_file", valid, "--test_file", test,
                         "--pruning_learning_rate", "1e-3", "--eval_strategy", "steps", "--eval_steps", "2")) == 0
    captured = capsys.readouterr()
    assert "dense arm: fine-tuning" in captured.err and "pruned arm: fine-tuning" in captured.err
    assert captured.err.index("dense arm: fine-tuning") < captured.err.index("pruned arm: fine-tuning")
    assert "| dense |" in captured.out and "| pruned |" in captured.out and "Labels: negative, positive" in captured.out

    results = json.loads((out / "results.json").read_text())
    data = results["data"]
    assert data["label_names"] == ["negative", "positive"]
    assert data["description"] == (f"train: train_file {train}; validation: validation_file {valid}; "
                                   f"test: test_file {test}")
    assert data["examples"] == {"train": 40, "validation": 8, "test": 10}
    assert set(results["arms"]) == {"dense", "pruned"}
    for arm in results["arms"].values():
        assert arm["accuracy"] * 10 == pytest.approx(round(arm["accuracy"] * 10))  # a count out of 10 test rows
    assert results["arms"]["pruned"]["sparsity"] == pytest.approx(results["pruning_config"]["target_sparsity"],
                                                                   abs=1e-3)
    assert results["arms"]["dense"]["sparsity"] < 0.01
    markdown = (out / "results.md").read_text()
    assert f"test: test_file {test}" in markdown and "Labels: negative, positive." in markdown

    for arm in ("dense", "pruned"):  # labels in the model config; reloads with plain from_pretrained
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out / arm)
        assert model.config.num_labels == 2
        assert model.config.id2label == {0: "negative", 1: "positive"}
        assert model.config.label2id == {"negative": 0, "positive": 1}
        assert (out / arm / "tokenizer_config.json").is_file()
    assert (training_args_of(out / "dense").learning_rate, training_args_of(out / "pruned").learning_rate) == (1e-4,
                                                                                                              1e-3)
    assert (out / "pruned" / "pruning_config.json").is_file()


def test_dense_only_fine_tunes_the_dense_arm_alone(model_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", labelled(40, ["positive", "negative"]))
    test = write_csv(tmp_path / "test.csv", labelled(10, ["negative", "positive"], seed=2))
    out = tmp_path / "out"
    assert main(tiny_run(model_dir, out, "--train_file", train, "--test_file", test, "--dense_only")) == 0
    assert "pruned arm" not in capsys.readouterr().err
    assert set(json.loads((out / "results.json").read_text())["arms"]) == {"dense"}
    assert transformers.AutoModelForSequenceClassification.from_pretrained(out / "dense").config.num_labels == 2
    assert not (out / "pruned").exists()
    with pytest.raises(SystemExit, match="--dense_only"):
        main(tiny_run(model_dir, tmp_path / "out2", "--train_file", train, "--dense_only", "--teacher_path", "x"))


def test_train_on_jsonl_sentence_pairs_with_integer_labels(model_dir, tmp_path):
    def pairs(n, seed):
        return [{"sentence1": a, "sentence2": b, "label": i % 3}
                for i, (a, b) in enumerate(zip(texts(n, seed), texts(n, seed + 10)))]

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(30, 0)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(9, 1)))
    out = tmp_path / "out"
    assert main(tiny_run(model_dir, out, "--train_file", str(tmp_path / "train.jsonl"), "--test_file",
                         str(tmp_path / "test.jsonl"), "--no_distill")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["label_names"] == ["0", "1", "2"]
    assert results["data"]["text_columns"] == ["sentence1", "sentence2"]
    assert results["job"]["distill"] is False
    config = transformers.AutoConfig.from_pretrained(out / "pruned")
    assert config.num_labels == 3 and config.id2label == {0: "0", 1: "1", 2: "2"}


def test_train_file_only_carves_a_seeded_test_split_and_says_so(model_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", labelled(40, ["good", "bad", "meh"]))
    out = tmp_path / "out"
    assert main(tiny_run(model_dir, out, "--train_file", train, "--test_size", "0.25", "--split_seed", "7",
                         "--max_train_samples", "20")) == 0
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["sources"]["test"] == f"25% of train_file {train}, seed 7"
    assert data["sources"]["train"] == (f"train_file {train} less the rows carved out for test, first 20 rows "
                                        "(--max_train_samples)")
    assert data["examples"] == {"train": 20, "test": 10}
    assert data["label_names"] == ["bad", "good", "meh"]
    assert f"test: 25% of train_file {train}, seed 7" in (out / "results.md").read_text()


def test_training_arguments_flags_reach_both_arms(classifier_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", labelled(40, ["positive", "negative"]))
    out = tmp_path / "out"
    # A 3-label classifier fine-tuned on 2 labels: its head is replaced (--ignore_mismatched_sizes).
    assert main(tiny_run(classifier_dir, out, "--ignore_mismatched_sizes", "--train_file", train,
                         "--gradient_accumulation_steps", "2",
                         "--save_strategy", "steps", "--save_steps", "2", "--seed", "3", "--warmup_steps", "1")) == 0
    for arm in ("dense", "pruned"):
        assert {p.name for p in (out / arm).glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}, arm
        args = training_args_of(out / arm)
        assert (args.gradient_accumulation_steps, args.seed, args.data_seed, args.warmup_steps) == (2, 3, 3, 1)
        assert args.output_dir == str(out / arm)
        state = json.loads((out / arm / "checkpoint-4" / "trainer_state.json").read_text())
        assert state["global_step"] == 4
    assert (out / "pruned" / "checkpoint-2" / "hf_prune_state.pt").is_file()
    assert json.loads((out / "results.json").read_text())["training_arguments"]["gradient_accumulation_steps"] == 2
    assert transformers.AutoConfig.from_pretrained(out / "pruned").id2label == {0: "negative", 1: "positive"}


def test_arm_arguments_split_output_dir_hub_id_and_learning_rate(tmp_path):
    args = parse_train_args(["--output_dir", str(tmp_path / "job"), "--push_to_hub", "--hub_model_id", "me/tweets",
                             "--learning_rate", "2e-5", "--seed", "5"]).training
    dense = arm_training_arguments(args, "dense")
    pruned = arm_training_arguments(args, "pruned", learning_rate=1e-3)
    assert (dense.output_dir, pruned.output_dir) == (str(tmp_path / "job" / "dense"), str(tmp_path / "job" / "pruned"))
    assert (dense.hub_model_id, pruned.hub_model_id) == ("me/tweets-dense", "me/tweets-pruned")
    assert (dense.learning_rate, pruned.learning_rate) == (2e-5, 1e-3)
    assert dense.data_seed == pruned.data_seed == 5  # the same batches in the same order
    unnamed = parse_train_args(["--output_dir", str(tmp_path / "job"), "--push_to_hub"]).training
    assert arm_training_arguments(unnamed, "pruned").hub_model_id == "job-pruned"
    assert arm_training_arguments(parse_train_args([]).training, "dense").hub_model_id is None  # no push: untouched


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model weights are loaded: data errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data error")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_file", "{tmp}/missing.csv"], r"--train_file '.*missing\.csv' does not exist"),
        (["--train_file", "{tmp}/train.txt"], r"--train_file '.*train\.txt' has an unsupported extension"),
        (["--train_file", "{train}", "--text_columns", "review"], r"--text_columns 'review': no such column.*'text'"),
        (["--train_file", "{train}", "--label_column", "stars"], r"--label_column 'stars': no such column.*'label'"),
        (["--train_file", "{one_class}"], r"--label_column 'label' has a single class \('positive'\)"),
        (["--train_file", "{train}", "--test_file", "{empty}"], r"--test_file '.*empty\.csv' has no rows"),
        (["--train_file", "{train}", "--test_file", "{unseen}"],
         r"label 'neutral' in row 1 of the test split \(test_file .*unseen\.csv\).*\['negative', 'positive'\]"),
        (["--train_file", "{train}", "--eval_strategy", "steps"], r"--eval_strategy steps needs a validation split"),
        (["--train_file", "{train}", "--max_length", "128"], r"--max_length 128 is more than .* \(64\)"),
        (["--train_file", "{train}", "--teacher_path", "{classifier}"],
         r"--teacher_path '.*classifier.*' has num_labels=3 but the data has 2 labels"),
        (["--train_file", "{train}", "--model_name_or_path", "{classifier}"],
         r"--model_name_or_path '.*classifier.*' is a classifier with num_labels=3 .* --ignore_mismatched_sizes"),
        (["--train_file", "{train}", "--resume_from_checkpoint", "{tmp}"], r"--resume_from_checkpoint '.*'"),
    ],
    ids=["missing-file", "extension", "text-column", "label-column", "one-class", "empty-split", "unseen-label",
         "eval-without-validation", "max-length", "teacher-labels", "head-size", "resume"],
)
def test_errors_name_the_option_and_value_before_any_model_is_loaded(model_dir, classifier_dir, tmp_path,
                                                                      no_model_loading, extra, message):
    files = {
        "tmp": str(tmp_path),
        "train": write_csv(tmp_path / "train.csv", labelled(20, ["positive", "negative"])),
        "one_class": write_csv(tmp_path / "one.csv", labelled(6, ["positive"])),
        "empty": write_csv(tmp_path / "empty.csv", []),
        "unseen": write_csv(tmp_path / "unseen.csv", [("good day", "positive"), ("bad day", "neutral")]),
        "classifier": classifier_dir,  # a 3-label classifier
    }
    (tmp_path / "train.txt").write_text("text,label\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        main(tiny_run(model_dir, out, *[a.format(**files) for a in extra]))
    assert not out.exists()


def test_hub_dataset_is_accepted_and_routed(model_dir, tmp_path, monkeypatch, no_model_loading):
    calls = []
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(n, seed, labels=None):
        return datasets.Dataset.from_dict({"sentence": texts(n, seed), "label": labels or [i % 2 for i in range(n)]},
                                          features=features)

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({"train": split(20, 0), "validation": split(6, 1), "test": split(4, 2, [-1] * 4)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = ["--dataset_name", "glue", "--dataset_config_name", "sst2"]
    with pytest.raises(SystemExit, match=r"label -1 in row 0 of the test split \(split 'test' of glue/sst2\).*"
                                         r"--test_split_name validation"):
        main(tiny_run(model_dir, tmp_path / "out", *hub))
    args = parse_train_args(["--model_name_or_path", model_dir, *hub, "--test_split_name", "validation",
                             "--max_length", "16"])
    job_data = JobData(args.job, args.data)
    assert calls == [("glue", "sst2"), ("glue", "sst2")]
    assert job_data.label_names == ["negative", "positive"]
    assert job_data.description == ("train: split 'train' of glue/sst2; validation: split 'validation' of glue/sst2; "
                                    "test: split 'validation' of glue/sst2")
    assert len(job_data.data["test"]) == 6 and len(job_data.data["train"][0]["input_ids"]) == 16
    assert not (tmp_path / "out").exists()


def test_runs_are_deterministic_and_both_arms_get_a_model_card(model_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", labelled(48, ["positive", "negative", "neutral"]))
    results = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(tiny_run(model_dir, out, "--train_file", train, "--target_sparsity", "0.5")) == 0
        results.append(json.loads((out / "results.json").read_text()))
        for arm in ("dense", "pruned"):
            card = (out / arm / "README.md").read_text()
            assert model_dir in card and "train_file" in card, arm  # base model and data on the card
            # ... and the test accuracy of this arm, next to the other arm's where there is one.
            accuracy = results[-1]["arms"][arm]["accuracy"]
            assert "## Test results" in card and f"| this model | {accuracy:.4f} |" in card, arm
        assert "| dense arm (same data, seed and steps) |" in (out / "pruned" / "README.md").read_text()
        assert "## Pruning (hf_prune)" in (out / "pruned" / "README.md").read_text()
    for arm in ("dense", "pruned"):
        assert results[0]["arms"][arm]["accuracy"] == results[1]["arms"][arm]["accuracy"]
        assert results[0]["arms"][arm]["macro_f1"] == results[1]["arms"][arm]["macro_f1"]
    assert training_args_of(tmp_path / "a" / "pruned").full_determinism is True
    # The "newly initialized" warning of the new classifier head is printed once per job, not once per arm.
    assert capsys.readouterr().err.count("newly initialized") <= 2  # once per run of the two


def test_a_rerun_reuses_the_dense_arm_and_continues_the_pruned_one_from_its_checkpoint(model_dir, tmp_path, caplog):
    import shutil

    train = write_csv(tmp_path / "train.csv", labelled(40, ["positive", "negative"]))
    test = write_csv(tmp_path / "test.csv", labelled(10, ["negative", "positive"], seed=2))
    out = tmp_path / "out"
    argv = tiny_run(model_dir, out, "--train_file", train, "--test_file", test, "--target_sparsity", "0.5",
                    "--save_strategy", "steps", "--save_steps", "2")
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["phases_reused"] == []
    pruned = {k: v.clone() for k, v in
              transformers.AutoModelForSequenceClassification.from_pretrained(out / "pruned").state_dict().items()}
    dense_weights = (out / "dense" / "model.safetensors").read_bytes()

    # Killed in the pruned arm after checkpoint-2: the dense arm is reused as it is, the pruned one continues from
    # checkpoint-2 and ends with the weights of the uninterrupted run.
    shutil.rmtree(out / "pruned" / "checkpoint-4")
    (out / "pruned" / "model.safetensors").unlink()
    with caplog.at_level("INFO", logger="hf_prune.commands.job"):
        assert main(argv) == 0
    assert "dense arm: reusing" in caplog.text and "continuing from" in caplog.text and "checkpoint-2" in caplog.text
    results = json.loads((out / "results.json").read_text())
    assert results["phases_reused"] == ["dense", "pruned (from its last checkpoint)"]
    assert results["arms"]["dense"] == first["arms"]["dense"]
    assert results["arms"]["pruned"]["accuracy"] == first["arms"]["pruned"]["accuracy"]
    assert (out / "dense" / "model.safetensors").read_bytes() == dense_weights  # not trained nor saved again
    again = transformers.AutoModelForSequenceClassification.from_pretrained(out / "pruned").state_dict()
    for name, tensor in pruned.items():
        torch.testing.assert_close(again[name], tensor, msg=name)

    # Other options or data for the dense arm: refused naming the difference; --resume_phases false starts over.
    with pytest.raises(SystemExit, match=r"dense.pt holds the dense phase of another run \(training.learning_rate: "):
        main([*argv, "--learning_rate", "1e-3"])
    other = write_csv(tmp_path / "other.csv", labelled(40, ["positive", "negative"], seed=5))
    with pytest.raises(SystemExit, match=r"dense.pt holds the dense phase of another run \(data.train: 'data:"):
        main([a if a != train else other for a in argv])
    # Only the pruned arm's settings changed: the dense arm is reused, the pruned arm's checkpoints are refused.
    with pytest.raises(SystemExit, match=r"pruned-started.pt holds the pruned-started phase of another run "
                                         r"\(pruning_config: "):
        main([*argv[:-4], "--target_sparsity", "0.75", *argv[-4:]])
    assert main([*argv, "--learning_rate", "1e-3", "--resume_phases", "false"]) == 0
    assert json.loads((out / "results.json").read_text())["phases_reused"] == []
