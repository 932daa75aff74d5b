"""Pictures of what pruning did (matplotlib is the optional `plot` extra: `pip install 'hf_prune[plot]'`).

Every function draws one PNG and returns the path it wrote, or returns None with one warning when matplotlib is not
installed. Empty or malformed input raises ValueError naming the argument, with or without matplotlib. Figures are
drawn on matplotlib's Agg canvas without pyplot, so no window opens, no figure stays open and the caller's backend
(a notebook's, say) is left alone.

    plot_layer_sparsity(report_or_model, path)
        Bars: x is the layer index, one bar per module type (query, key, value, fused qkv, attention output,
        FFN in, FFN out) inside each layer; a black tick marks the layer's sparsity over all its types and a dashed
        line the sparsity of all layers together. Tall bars are where the criterion found weights cheap to drop.
    plot_sparsity_heatmap(report_or_model, path)
        The same numbers as a layers x module types grid, each cell annotated with its sparsity; a dash marks a
        type the layer does not have.
    plot_head_importance(importance, path, removed=None)
        Heatmap of a [layers, heads] importance tensor (`compute_head_importance`), brighter = more important;
        heads in `removed` ({layer: [original head indices]}, e.g. `structure_summary(model)["pruned_heads"]`) are
        hatched in red.
    plot_schedule(log_history, path, metric="eval_accuracy")
        Sparsity over optimizer steps from a Trainer's `state.log_history`: the schedule's target (dashed) and the
        sparsity measured on the weights (solid), the fractions of heads / neurons removed when structured pruning
        ran, and the eval metric on the right axis where it was logged.
    plot_accuracy_vs_sparsity(rows, path)
        Accuracy over sparsity, one line per `label` (or `arm`); with several runs at one sparsity (seeds), the line
        joins their means and every run is a dot.
    plot_accuracy_latency(results, path)
        Accuracy against p50 latency for `hf-prune benchmark` results, one point per checkpoint and runtime.
    plot_lm_candidates(report, path)
        The shapes `hf-prune optimize` tried on a causal LM (its report.json): held-out perplexity (log scale) and
        decode speedup against the fraction of parameters kept, one marker per family of shapes, the chosen one
        ringed, the dense and optimized models marked, the targets dashed.
    plot_sensitivity(sensitivity, path)
        Heatmap of `hf_prune.sensitivity` results: one row per group (ordered by layer, then kind), one column per
        pruning level, coloured by the metric's change from the unpruned baseline (red: worse, blue: better, by the
        result's `higher_is_better`).
    plot_training(log_history, report_or_model, directory, metric="eval_accuracy")
        `schedule.png` and `layer_sparsity.png` in `directory` (what `PruningTrainer(plot_dir=...)` and
        `hf-prune train` write); a picture that cannot be drawn is skipped with a warning.

`sparsity_by_layer(report_or_model)` returns the numbers behind the two sparsity pictures: {layer: {module type:
sparsity}}. Module types come from the module names of the architectures `hf_prune.structure.layout` knows (BERT,
RoBERTa, DistilBERT, GPT-2, Llama-style); any other module is labelled by its path inside the layer.

Modules: `canvas` (the matplotlib probe, figures, heatmaps), `sparsity`, `heads`, `training` (schedule and the
end-of-training pair), `results` (accuracy vs sparsity or latency, sensitivity, causal-LM candidates).
"""

from .canvas import is_matplotlib_available
from .heads import plot_head_importance
from .results import plot_accuracy_latency, plot_accuracy_vs_sparsity, plot_lm_candidates, plot_sensitivity
from .sparsity import plot_layer_sparsity, plot_sparsity_heatmap, sparsity_by_layer
from .training import plot_schedule, plot_training

__all__ = [
    "is_matplotlib_available",
    "plot_accuracy_latency",
    "plot_accuracy_vs_sparsity",
    "plot_head_importance",
    "plot_layer_sparsity",
    "plot_lm_candidates",
    "plot_schedule",
    "plot_sensitivity",
    "plot_sparsity_heatmap",
    "plot_training",
    "sparsity_by_layer",
]
