"""A causal LM made smaller, arms side by side at one recovery budget: the packaged SmolLM2-135M on BBC News.

    python benchmarks/optimize_lm.py --steps 30 --block_size 128 --batch 4 --target_params 0.6

Every arm starts from the same dense weights and is recovered with the same steps, learning rate, batch and data
order (windows of the calibration articles), distilled from the dense model (KL on the logits plus the LM loss,
alpha 0.9), except the dense arm, which is fine-tuned on the same text with the LM loss: the fair baseline.

    dense           fine-tuned on the same text (no pruning)
    depth           whole layers removed, lowest block influence first, until <= target of the parameters
    width           hidden channels removed (activation importance, a multiple of 8 left) until <= target
    heads+neurons   attention heads (whole key/value groups) and FFN neurons (activation) until <= target
    combined        25% of the hidden channels, then heads and neurons until <= target (width first, Minitron)
    wanda-50%       one-shot unstructured 50% (no recovery): the no-speed reference

Importance is scored once on the dense model. Reported: parameters, held-out perplexity after the cut and after
recovery, decode tokens/s at batch 1 (greedy, key/value cache) and prefill latency, all arms timed interleaved in
one run on this machine. Writes benchmarks/results/optimize_lm.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from hf_prune import PruningConfig, PruningTrainer, evaluate_perplexity, load_pruned, oneshot, structure_summary
from hf_prune.commands.markdown import table
from hf_prune.commands.optimize_lm import Windows, parameters, token_ids
from hf_prune.commands.shapes import cut as cut_shape
from hf_prune.commands.shapes import score_structures
from hf_prune.runtime import decode_timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None, help="default: the packaged SmolLM2-135M")
    parser.add_argument("--target_params", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--eval_tokens", type=int, default=8192)
    parser.add_argument("--timing_rounds", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["dense", "depth", "width", "heads+neurons", "combined",
                                                      "wanda-50%"])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "optimize_lm"))
    args = parser.parse_args()
    from hf_prune.recipes.packaged_lm import news_articles, packaged_lm_path

    path = args.model_name_or_path or packaged_lm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = load_pruned(path).float().eval()
    train_ids, held_ids = token_ids(tokenizer, news_articles("calibration")), token_ids(tokenizer,
                                                                                        news_articles("held_out"))
    windows = Windows(train_ids, args.block_size)
    calibration = torch.utils.data.DataLoader(windows, batch_size=args.batch, shuffle=True,
                                              generator=torch.Generator().manual_seed(0),
                                              collate_fn=default_data_collator)
    start = time.perf_counter()
    # Scored and cut as `hf-prune optimize` does (activation importance, block-influence layers, hidden channels
    # in multiples of 8), every axis at once.
    options = argparse.Namespace(importance="activation", layer_importance="block_influence", layers_to_remove=0,
                                 hidden_fraction=0.0, calibration_batches=args.calibration_batches,
                                 model_name_or_path=path)
    found = score_structures(dense, calibration, options, every_axis=True)
    importance_seconds = time.perf_counter() - start
    total = parameters(dense)

    def cut(layers: int = 0, hidden: float = 0.0, fraction: float = 0.0) -> torch.nn.Module:
        return cut_shape(dense, found.with_axes(dense, layers, hidden), fraction).eval()

    def least(make, grid) -> tuple[torch.nn.Module, str]:
        """The first shape of `grid` (least pruning first) at or under the parameter target."""
        for value in grid:
            model = make(value)
            if parameters(model) / total <= args.target_params:
                return model, value
        return model, value

    steps = [round(0.05 * i, 2) for i in range(1, 20)]
    shapes = {
        "depth": lambda: least(lambda k: cut(layers=k), range(1, structure_summary(dense)["num_layers"])),
        "width": lambda: least(lambda h: cut(hidden=h), steps),
        "heads+neurons": lambda: least(lambda f: cut(fraction=f), steps),
        "combined": lambda: least(lambda f: cut(hidden=0.25, fraction=f), steps),
    }
    rows, models = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for arm in args.arms:
            start = time.perf_counter()
            row: dict = {}
            if arm == "wanda-50%":
                model = copy.deepcopy(dense)
                oneshot(model, list(calibration)[: args.calibration_batches], method="wanda", sparsity=0.5,
                        show_progress=False)
                row["setting"] = "50% unstructured, one-shot"
            elif arm == "dense":
                model = recover(copy.deepcopy(dense), None, windows, args, os.path.join(work, arm))
                row["setting"] = "fine-tuned, LM loss"
            else:
                model, value = shapes[arm]()
                row["setting"] = {"depth": "{} layers removed", "width": "{:.0%} of the hidden size removed",
                                  "heads+neurons": "{:.0%} of heads and neurons removed",
                                  "combined": "25% of the hidden size and {:.0%} of heads and neurons removed"}[arm]
                row["setting"] = row["setting"].format(value)
                row["perplexity_after_cut"] = perplexity(model, held_ids, args)
                model = recover(model, dense, windows, args, os.path.join(work, arm))
            row.update(parameters=parameters(model), params_ratio=parameters(model) / total,
                       perplexity=perplexity(model, held_ids, args), seconds=time.perf_counter() - start)
            rows[arm], models[arm] = row, model.eval()
            print(f"{arm}: {row}", flush=True)
        prompt = held_ids[:64].unsqueeze(0)
        timings = decode_timings({"untrained dense": dense, **models}, prompt, 32, args.timing_rounds)
    base = timings["untrained dense"]["decode_tokens_per_s"]
    for arm, row in rows.items():
        row.update(timings[arm], decode_speedup=timings[arm]["decode_tokens_per_s"] / base)
    reference = rows.get("dense", {}).get("perplexity")
    for row in rows.values():
        row["perplexity_vs_dense"] = row["perplexity"] / reference if reference else None
    result = {"model": path, "target_params": args.target_params, "steps": args.steps, "batch": args.batch,
              "block_size": args.block_size, "learning_rate": args.learning_rate, "eval_tokens": args.eval_tokens,
              "importance_seconds": importance_seconds, "threads": torch.get_num_threads(),
              "dense_decode_tokens_per_s": base, "dense_prefill_ms": timings["untrained dense"]["prefill_ms"],
              "arms": rows}
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(f"{args.output}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    with open(f"{args.output}.md", "w", encoding="utf-8") as handle:
        handle.write(markdown(result))
    print(markdown(result))


def recover(model, teacher, windows, args, output_dir: str):
    """`args.steps` steps on the training windows: distilled from `teacher` (KL + LM loss) or, without one, the LM
    loss alone; every arm sees the same batches in the same order."""
    training = TrainingArguments(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                 learning_rate=args.learning_rate, warmup_steps=max(1, round(0.06 * args.steps)),
                                 logging_steps=max(1, args.steps // 5), save_strategy="no", report_to="none",
                                 seed=42, data_seed=42, dataloader_num_workers=0)
    if teacher is None:
        trainer = Trainer(model=model.train(), args=training, train_dataset=windows,
                          data_collator=default_data_collator)
    else:
        trainer = PruningTrainer(model=model.train(), args=training, teacher_model=teacher, train_dataset=windows,
                                 pruning_config=PruningConfig(target_sparsity=0.0, distillation_alpha=0.9),
                                 data_collator=default_data_collator)
    trainer.train()
    return trainer.model.eval()


def perplexity(model, ids, args) -> float:
    return evaluate_perplexity(model.eval(), input_ids=ids, window=args.block_size, max_tokens=args.eval_tokens,
                               batch_size=8).perplexity


def markdown(result: dict) -> str:
    lines = [f"Packaged SmolLM2-135M ({result['model']}), BBC News: every arm recovered {result['steps']} steps "
             f"(batch {result['batch']} x {result['block_size']} tokens, lr {result['learning_rate']:g}), "
             f"perplexity over {result['eval_tokens']} held-out tokens, decode at batch 1 on {result['threads']} "
             f"threads (untrained dense: {result['dense_decode_tokens_per_s']:.1f} tokens/s, prefill "
             f"{result['dense_prefill_ms']:.0f} ms). Target: <= {result['target_params']:g} of the parameters.", ""]
    rows = []
    for arm, row in result["arms"].items():
        vs = row.get("perplexity_vs_dense")
        rows.append([arm, row["setting"], f"{row['params_ratio']:.2f}",
                     f"{row['perplexity_after_cut']:.1f}" if "perplexity_after_cut" in row else "-",
                     f"{row['perplexity']:.2f}", "-" if vs is None else f"{vs:.2f}x",
                     f"{row['decode_tokens_per_s']:.1f}", f"{row['decode_speedup']:.2f}x", f"{row['prefill_ms']:.0f}"])
    lines += table(["arm", "shape", "params (of dense)", "ppl after cut", "ppl recovered", "vs fine-tuned dense",
                    "decode tokens/s", "decode speedup", "prefill ms"], rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
