"""`hf-prune` command line: parses, then calls the modules that do the work.

    hf-prune train --config configs/default.yaml --target_sparsity 0.8 --max_steps 100

A config file is a flat YAML mapping of `JobArguments` and `PruningConfig` fields; every field can also be given
(or overridden) on the command line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional, Sequence

from transformers import HfArgumentParser

from .config import PruningConfig


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise SystemExit(f"hf-prune: --config {path!r} does not exist.") from None
    if not isinstance(data, dict):
        raise SystemExit(f"hf-prune: --config {path!r} must hold a mapping of option: value, got {type(data).__name__}.")
    return data


def parse_train_args(argv: Sequence[str]):
    """(JobArguments, PruningConfig) from an optional `--config` YAML file overridden by command-line flags."""
    from .job import JobArguments

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)

    parser = HfArgumentParser((JobArguments, PruningConfig), prog="hf-prune train")
    parser.add_argument("--config", default=None, help="YAML file of options; command-line flags override it.")
    if known.config:
        values = _read_yaml(known.config)
        allowed = {f.name for f in fields(JobArguments)} | {f.name for f in fields(PruningConfig)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise SystemExit(
                f"hf-prune: unknown option(s) {unknown} in {known.config}; allowed options are {sorted(allowed)}."
            )
        parser.set_defaults(**values)
    job, pruning_config, _ = parser.parse_args_into_dataclasses(args=list(rest) + ["--config", str(known.config)])
    return job, pruning_config


def _train(argv: Sequence[str]) -> int:
    from .job import format_table, run_job

    try:
        job, pruning_config = parse_train_args(argv)
    except ValueError as err:
        raise SystemExit(f"hf-prune: {err}") from None
    results = run_job(job, pruning_config)
    print()
    print(format_table(results))
    print(f"\nPruned model, pruning_config.json and sparsity report: {job.output_dir}/pruned")
    print(f"Results: {job.output_dir}/results.json, {job.output_dir}/results.md")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": (_train, "fine-tune a dense and a pruned model side by side and compare them")}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = ["usage: hf-prune COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in commands.items()]
        lines += ["", "Run `hf-prune COMMAND --help` for the options of a command."]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhf-prune: unknown command {argv[0]!r}; choose one of {sorted(commands)}.", file=sys.stderr)
            return 2
        return 0 if argv else 2
    handler, _ = commands[argv[0]]
    return handler(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
