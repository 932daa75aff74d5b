"""2:4 on GPUs: dense vs semi-structured sparse latency of a Linear stack and of a whole causal LM, in one run.

    python benchmarks/semi_structured.py                    # needs a CUDA GPU of compute capability 8.0+
    python benchmarks/semi_structured.py --backend cutlass

1. Linear stack: `--layers` Linear layers of (`--out_features` x `--in_features`), fp16, pruned to 2:4 by
   magnitude, timed at each `--tokens` count (rows of the input) dense and after `hf_prune.to_semi_structured`.
2. Whole model: the packaged SmolLM2-135M (or `--model_name_or_path`) pruned to 2:4 with Wanda (`hf_prune.oneshot`),
   fp16 on the GPU, one forward pass of `--batch_sizes` x `--sequence_length` tokens timed dense and converted.

Times are medians of `--repeats` runs after `--warmup`, with CUDA synchronised around each. Where the kernels cannot
run (no GPU, older GPU) the script writes that reason to the results and exits 0: the 2:4 zeros are then an
accuracy/storage format only.

Writes benchmarks/results/semi_structured.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from hf_prune import oneshot, to_semi_structured
from hf_prune.semi_structured import semi_structured_unavailable


def median_ms(run, warmup: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def two_four_by_magnitude(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    return torch.zeros_like(groups).scatter_(-1, keep, groups.gather(-1, keep)).reshape(weight.shape)


def linear_stack(args) -> list[dict]:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for _ in range(args.layers):
        block = torch.nn.Module()
        block.proj = torch.nn.Linear(args.in_features, args.out_features, bias=False)
        block.proj.weight.data = two_four_by_magnitude(block.proj.weight.data)
        model.layers.append(block)
    dense = model.half().cuda()
    sparse = copy.deepcopy(dense)
    to_semi_structured(sparse, backend=args.backend)

    def forward(m, x):
        for block in m.layers:
            block.proj(x)

    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.in_features, dtype=torch.half, device="cuda")
        d = median_ms(lambda: forward(dense, x), args.warmup, args.repeats)
        s = median_ms(lambda: forward(sparse, x), args.warmup, args.repeats)
        rows.append({"case": f"{args.layers} x Linear({args.in_features}->{args.out_features})", "tokens": tokens,
                     "dense_ms": d, "two_four_ms": s, "speedup": d / s})
        print(rows[-1], flush=True)
    return rows


def whole_model(args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from hf_prune.recipes.packaged_lm import packaged_lm_path

    path = args.model_name_or_path or packaged_lm_path()
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batches = [torch.randint(0, dense.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    pruned = copy.deepcopy(dense)
    oneshot(pruned, batches, method="wanda", pattern="2:4", device="cuda", show_progress=False)
    dense, pruned = dense.half().cuda(), pruned.half().cuda()
    report = to_semi_structured(pruned, backend=args.backend)
    rows = []
    for batch in args.batch_sizes:
        ids = torch.randint(0, dense.config.vocab_size, (batch, args.sequence_length), device="cuda")
        d = median_ms(lambda: dense(input_ids=ids, use_cache=False), args.warmup, args.repeats)
        s = median_ms(lambda: pruned(input_ids=ids, use_cache=False), args.warmup, args.repeats)
        rows.append({"case": f"{os.path.basename(path.rstrip('/'))} forward ({len(report['converted'])} layers 2:4, "
                             f"{len(report['skipped'])} skipped)", "tokens": batch * args.sequence_length,
                     "dense_ms": d, "two_four_ms": s, "speedup": d / s})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "cusparselt", "cutlass"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--in_features", type=int, default=4096)
    parser.add_argument("--out_features", type=int, default=11008)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 1024, 8192])
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--sequence_length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip_model", action="store_true", help="time only the Linear stack")
    parser.add_argument("--output", default="benchmarks/results/semi_structured")
    args = parser.parse_args()
    reason = semi_structured_unavailable()
    result: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "backend": args.backend}
    if reason is not None:
        result["not_run"] = f"2:4 kernels unavailable: {reason}"
        print(result["not_run"])
    else:
        result["rows"] = linear_stack(args) + ([] if args.skip_model else whole_model(args))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as handle:
        json.dump(result, handle, indent=2)
    lines = ["# 2:4 semi-structured sparsity on GPU: dense vs 2:4 latency", "",
             f"- device: {result['device']}; torch {result['torch']}; backend {args.backend}", ""]
    if "not_run" in result:
        lines.append(f"Not run: {result['not_run']}.")
    else:
        lines += ["| case | tokens | dense (ms) | 2:4 (ms) | speedup |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['tokens']} | {r['dense_ms']:.3f} | {r['two_four_ms']:.3f} | {r['speedup']:.2f}x |"
                  for r in result["rows"]]
    with open(args.output + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
