"""What `hf-prune optimize` writes: report.md (the verdict, the candidate shapes, the recoveries, dense vs result in
ONNX Runtime), report.json and report.png."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional

from ..files import atomic_write_text
from .markdown import table

REPORT_NAME = "report"


def seed_summary(final: list[Any], dense: dict[str, Any]) -> dict[str, Any]:
    """Mean and spread over the recovery seeds of the chosen shape, on test (and validation)."""
    summary: dict[str, Any] = {"seeds": [r.seed for r in final]}
    for split in ("test", "validation"):
        if dense[split] is None:
            continue
        for key in ("accuracy", "macro_f1"):
            values = [getattr(r, split)[key] for r in final]
            summary[f"{split}_{key}_mean"] = statistics.mean(values)
            summary[f"{split}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[f"{split}_drop_points_mean"] = (dense[split]["accuracy"] - summary[f"{split}_accuracy_mean"]) * 100
    return summary


def format_report(report: dict[str, Any]) -> str:
    """report.md: the verdict, the candidates tried, the recoveries, dense vs result in ONNX Runtime."""
    target, chosen, settings = report["target"], report["chosen"], report["settings"]
    batch = target["speedup_batch_size"]
    goal = []
    if target["speedup"] is not None:
        goal.append(f"{target['speedup']:g}x faster in ONNX Runtime {target['speedup_precision']} at batch {batch}")
    if target["max_accuracy_drop"] is not None:
        goal.append(f"at most {target['max_accuracy_drop']:g} points of validation accuracy lost")
    verdict = "met" if target["met"] else "NOT MET"
    lines = [f"# hf-prune optimize: {verdict}", "",
             f"Target: {' and '.join(goal)}. Result: {chosen['fraction_removed']:.0%} of attention heads and FFN "
             f"neurons removed{_width_depth(chosen)}, {target['achieved_speedup']:.2f}x at batch {batch} "
             f"({target['speedup_precision']}) in the final benchmark."]
    if "validation_drop_points" in target:
        lines[-1] += f" Validation accuracy {target['validation_drop_points']:+.2f} points lost (best seed)."
    if not target["met"]:
        lines += ["", "**The target was not met**; the closest point reached is reported below. Allow more pruning "
                  "(--max_fraction), more recovery (--max_steps), or relax the target."]
    seeds = report["seeds"]
    test_drop = seeds["test_drop_points_mean"]
    lines += ["", f"Data: {report['data']['description']}. Wall time {report['wall_seconds'] / 60:.1f} min "
              f"({', '.join(f'{k[:-8]} {v:.0f} s' for k, v in report['phases'].items())}), "
              f"{settings['threads']} threads, ONNX Runtime {settings['onnxruntime']}.", ""]

    lines += ["## Candidate shapes tried (timed in ONNX Runtime before training)", ""]
    if _width_depth(chosen):
        lines += [f"Every candidate also has{_width_depth(chosen)[1:]}.", ""]
    rows = []
    for p in sorted(report["candidates"], key=lambda p: p["fraction"]):
        ms, sp = ({int(k): v for k, v in p[key].items()} for key in ("ms", "speedup"))
        dense_ms = {int(k): v for k, v in p["dense_ms"].items()}
        mark = " **(chosen)**" if p["fraction"] == chosen["fraction_removed"] else ""
        rows.append([f"{p['fraction']:.0%}{mark}", f"{p['parameters'] / 1e6:.2f}M", f"{p['flop_ratio_limit']:.2f}x",
                     f"{ms[1]:.1f}", f"{sp[1]:.2f}x", f"{ms[batch]:.1f}", f"{sp[batch]:.2f}x", f"{dense_ms[batch]:.1f}"])
    lines += table(["heads+neurons removed", "params", "FLOP limit", "b1 ms", "b1 speedup", f"b{batch} ms",
                    f"b{batch} speedup", f"dense b{batch} ms (same rounds)"], rows)
    lines += ["", "## Recoveries", "",
              f"{settings['training_arguments']['max_steps']} steps at lr {settings['training_arguments']['learning_rate']:g}"
              f"{', distilled from the dense model' if settings['optimize']['distill'] else ''}. Dense: validation "
              f"{fmt_scores(report['dense']['validation'])}, test {fmt_scores(report['dense']['test'])}.", ""]
    rows = []
    for r in report["recoveries"]:
        mark = " **(kept)**" if r["fraction"] == chosen["fraction_removed"] and r["seed"] == chosen["seed"] else ""
        rows.append([f"{r['fraction']:.0%}", f"{r['seed']}{mark}", fmt_scores(r["validation"]),
                     f"{r['test']['accuracy']:.4f}", f"{r['test']['macro_f1']:.4f}", f"{r['seconds']:.0f}"])
    lines += table(["removed", "seed", "validation accuracy", "test accuracy", "test macro-F1", "time (s)"], rows)
    if len(seeds["seeds"]) > 1:
        lines += ["", f"Over the {len(seeds['seeds'])} seeds of the chosen shape: test accuracy "
                  f"{seeds['test_accuracy_mean']:.4f} ± {seeds['test_accuracy_std']:.4f} "
                  f"({-test_drop:+.2f} points vs dense), macro-F1 {seeds['test_macro_f1_mean']:.4f}."]

    lines += ["", "## Dense vs result in ONNX Runtime (one interleaved run, test split)", ""]
    rows = [[r["name"], r["precision"], f"{r.get('accuracy', float('nan')):.4f}",
             f"{r.get('accuracy_delta_points') or 0:+.2f}", f"{r.get('macro_f1', float('nan')):.4f}",
             f"{r['size_mb']:.1f}", f"{r['p50_ms_b1']:.1f}", f"{r.get('speedup_b1', 1):.2f}x",
             f"{r[f'p50_ms_b{batch}']:.1f}", f"{r.get(f'speedup_b{batch}', 1):.2f}x", f"{r['flop_ratio_limit']:.2f}x",
             _fmt_optional(r.get("speedup_of_flop_limit"))] for r in report["benchmark"]]
    lines += table(["model", "graph", "accuracy", "Δ pts", "macro-F1", "size MB", "b1 p50 ms", "b1 speedup",
                    f"b{batch} p50 ms", f"b{batch} speedup", "FLOP limit", "of limit"], rows)
    lines += ["", f"Model: `{report['outputs']['model']}` (`hf_prune.load_pruned`); ONNX: `{report['outputs']['onnx']}` "
              "(`hf_prune.create_session`)."]
    return "\n".join(lines) + "\n"


def _width_depth(chosen: dict[str, Any]) -> str:
    parts = []
    if chosen.get("layers_removed"):
        parts.append(f"layers {chosen['layers_removed']} removed ({chosen['num_layers']} left)")
    if chosen.get("hidden_size") is not None and chosen.get("original_hidden_size", chosen["hidden_size"]) != chosen["hidden_size"]:
        parts.append(f"hidden size {chosen['original_hidden_size']} -> {chosen['hidden_size']}")
    return "".join(f", {part}" for part in parts)


def fmt_scores(scores: Optional[dict[str, float]]) -> str:
    return "-" if scores is None else f"{scores['accuracy']:.4f}"


def _fmt_optional(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_report(report: dict[str, Any], output_dir: str, benchmark: dict[str, Any]) -> dict[str, str]:
    """report.json, report.md and (with matplotlib) report.png, the accuracy-latency plot, in `output_dir`."""
    from ..plot import plot_accuracy_latency

    paths = {"json": os.path.join(output_dir, f"{REPORT_NAME}.json"),
             "markdown": os.path.join(output_dir, f"{REPORT_NAME}.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["markdown"], format_report(report))
    png = plot_accuracy_latency(benchmark, os.path.join(output_dir, f"{REPORT_NAME}.png"))
    if png:
        paths["png"] = png
    return paths
